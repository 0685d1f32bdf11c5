"""Losing a whole Ray node: a spare node takes over and every request completes with the
same tokens; when no capacity is left, requests fail with a clear error and nothing hangs.
The scenario runs in its own process on a ray.cluster_utils.Cluster of four nodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def report():
    proc = subprocess.run([sys.executable, "-m", "tests.cluster.node_failure_run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert not result.get("hung"), "the scenario hung"
    return result


def test_workers_on_separate_nodes_use_gloo(report):
    assert report["backend"] == "gloo"  # auto: ranks on different nodes


def test_node_loss_costs_a_pause_not_a_request(report):
    assert report["restarts_after_node_loss"] == 1
    assert report["identical_after_node_loss"]
    assert report["removed"][0] not in report["nodes_after_recovery"]  # the spare took over
    print("recovery after node loss:", {k: round(v, 2) for k, v in report["recovery"].items()})


def test_no_capacity_fails_requests_clearly(report):
    outcomes = report["no_capacity"].values()
    assert all(o["finish"] == "abort" for o in outcomes)
    assert all("could not restart the workers within 10s" in o["error"] for o in outcomes)
    assert report["status"] == "failed"
    assert "fault.recovery_timeout_s" in report["reason"]
    assert report["admitted_while_failed"] is False
    assert "not serving" in report["unavailable_message"]

"""Tensor and pipeline parallelism across hosts: Ray nodes in separate network namespaces
(tests/netns.py), tp=2 x pp=2 with every rank on a host of its own, so the TP all-reduces and
the stage hand-offs go over Gloo between the hosts' interfaces; greedy outputs equal
transformers' and survive losing a whole host mid-generation (a spare host takes over).

The scenario (tests/cluster/multihost_run.py) runs as the driver inside the head host; this
side owns the hosts and kills one when the scenario asks. Needs root and ``ip netns``.
"""

from __future__ import annotations

import ipaddress
import json
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import netns

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
SUBNET = ipaddress.ip_network(f"{netns.SUBNET}.0/24")
SCENARIO_TIMEOUT_S = 240
TP, PP = 2, 2  # STRICT_SPREAD: one host per rank, plus one spare host


def run_scenario(cluster: netns.NetnsRayCluster, *args: str) -> dict:
    """Run the scenario in the head host; serve its KILL requests; its RESULT as a dict."""
    log = netns.RUN_DIR / "scenario.log"
    env = cluster.env | {"SHARDLM_SCENARIO_TIMEOUT_S": str(SCENARIO_TIMEOUT_S)}
    argv = [sys.executable, "-m", "tests.cluster.multihost_run", cluster.address, *args]
    with open(log, "w") as err:
        proc = cluster.popen_in(cluster.head.ns, argv, cwd=ROOT, env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        lines = netns.stdout_lines(proc)
        result, kills, deadline = None, [], time.monotonic() + SCENARIO_TIMEOUT_S + 30
        try:
            while (line := lines.get(timeout=max(1.0, deadline - time.monotonic()))) is not None:
                if line.startswith("KILL "):
                    ns = cluster.ns_of(line.split()[1])
                    started = time.monotonic()
                    killed = cluster.kill_node(ns)
                    kills.append({"ns": ns, "processes": killed, "kill_s": time.monotonic() - started})
                    proc.stdin.write(f"KILLED {ns} {killed}\n")
                    proc.stdin.flush()
                elif line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT "):])
            proc.wait(timeout=30)
        except queue.Empty:
            pass
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = log.read_text(errors="replace")[-6000:]
    assert result is not None, f"no RESULT (exit {proc.returncode}):\n{stderr}"
    assert not result.get("hung"), f"the scenario hung:\n{stderr}"
    return result | {"kills": kills, "exit": proc.returncode}


@pytest.fixture(scope="module")
def report():
    reason = netns.unavailable_reason()
    if reason:
        print(f"skipping the multi-host test: {reason}")
        pytest.skip(reason)
    workers = tuple(f"w{i + 1}" for i in range(TP * PP + 1))  # the last one: the spare
    with netns.netns_ray_cluster(workers=workers) as cluster:
        result = run_scenario(cluster, "--tp", str(TP), "--pp", str(PP))
        result["cluster_timings"] = cluster.timings
        result["hosts"] = {h.ip: {"ns": h.ns, "ifname": h.ifname} for h in cluster.hosts.values()}
    print("multihost timings:", json.dumps({k: round(v, 2) for k, v in
                                           (result["timings"] | result["cluster_timings"]).items()}))
    return result


def test_greedy_across_hosts_matches_transformers(report):
    assert report["outputs"] == report["reference"]
    assert report["matches_reference"]
    assert len({t for out in report["outputs"] for t in out}) > 10  # the comparison means something


def test_ranks_on_different_hosts_over_gloo(report):
    ranks, hosts = report["ranks"], report["hosts"]
    ips = [r["ip"] for r in ranks]
    assert len(set(ips)) == len(ranks) == TP * PP, ranks
    assert all(ipaddress.ip_address(ip) in SUBNET for ip in ips), ips
    assert report["backend"] == "gloo"
    assert {r["tp_backend"] for r in ranks} == {"gloo"}
    if PP > 1:  # the stage hand-offs cross hosts too
        assert {r["pp_backend"] for r in ranks} == {"gloo"}
    for r in ranks:  # each worker pointed Gloo at its own host's interface, not loopback
        assert r["GLOO_SOCKET_IFNAME"] == r["interface_of_node_ip"] == hosts[r["ip"]]["ifname"], r
    print("ranks:", [(r["name"], r["ip"], r["GLOO_SOCKET_IFNAME"], r["layers"]) for r in ranks])


def test_host_lost_mid_generation_costs_a_pause(report):
    assert [k["ns"] for k in report["kills"]] == [report["hosts"][report["killed_ip"]]["ns"]]
    assert report["kills"][0]["processes"] > 0
    assert report["restarts"] == 1
    assert report["outputs_after_kill"] == report["reference"]
    assert report["identical_after_kill"]
    after = [r["ip"] for r in report["ranks_after_recovery"]]
    assert len(set(after)) == TP * PP and report["killed_ip"] not in after, after
    assert report["backend_after_recovery"] == "gloo"
    assert {r["tp_backend"] for r in report["ranks_after_recovery"]} == {"gloo"}
    print("recovery:", {k: round(v, 2) for k, v in report["recovery"].items()})


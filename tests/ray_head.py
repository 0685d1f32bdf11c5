"""A separate Ray head with the job server (dashboard), started with `ray start --head`.

Its processes live in their own session and are killed by process group when done, so
the test session's own local Ray (and anything else on the machine) is left alone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from workers.comm import find_free_port

RAY = str(Path(sys.executable).with_name("ray"))


@contextlib.contextmanager
def ray_head(num_cpus: int = 2):
    """Yields (gcs address, dashboard URL) of a fresh head node with the job server."""
    from ray.job_submission import JobSubmissionClient

    port, dashboard = find_free_port("127.0.0.1"), find_free_port("127.0.0.1")
    # every per-node port of its own: the test session's local Ray holds the defaults
    ports = {flag: find_free_port() for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")}
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--disable-usage-stats", *[f"--{flag}={value}" for flag, value in ports.items()]],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not come up (exit {proc.poll()})")
                time.sleep(1)
        yield f"127.0.0.1:{port}", url
    finally:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for_job(client, job_id: str, timeout: float = 300) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still {client.get_job_status(job_id)} after {timeout}s")


def submit(client, entrypoint: str, timeout: float = 120) -> str:
    """Submit a job, waiting for the head's job agent to come up (it starts after the API)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)

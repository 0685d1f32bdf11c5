"""Waiting for engine services (the actors of cluster.serving.service) in tests."""

from __future__ import annotations

import time

import ray


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

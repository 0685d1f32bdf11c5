"""Joining a Ray cluster from the driver."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger("shardlm")


def connect_ray(address: str | None = None) -> None:
    """Join the cluster at ``address`` (or $RAY_ADDRESS, or a running local one), else start one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    try:
        ray.init(address="auto", log_to_driver=False)
        log.info("joined the running Ray cluster")
    except ConnectionError:
        ray.init(include_dashboard=False, log_to_driver=False)
        log.info("started a local Ray instance")

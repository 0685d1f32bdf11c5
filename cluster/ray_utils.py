"""Joining a Ray cluster from the driver."""

from __future__ import annotations

import logging
import os
import socket

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
    local = running_local_cluster()
    if local:
        ray.init(address=local, log_to_driver=False)
        log.info("joined the running Ray cluster at %s", local)
    else:  # "local": never the address file of a cluster that is gone
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        log.info("started a local Ray instance")


def running_local_cluster(temp_dir: str | None = None) -> str | None:
    """The address of the Ray cluster this machine last started, if its GCS answers.

    Ray remembers the last cluster in ``<temp dir>/ray_current_cluster``; after an unclean
    exit the file outlives the cluster, and ``ray.init(address="auto")`` then retries the
    dead address for minutes. A one-second TCP probe tells the two apart."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        address = canonicalize_bootstrap_address("auto", temp_dir)
    except ConnectionError:  # no address file and no GCS process here
        return None
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return address
    except (OSError, ValueError):
        log.warning("no Ray cluster answers at %s (left by a cluster that is gone); "
                    "starting a local one", address)
        return None

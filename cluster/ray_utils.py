"""Joining a Ray cluster from the driver."""

from __future__ import annotations

import logging
import os
import socket

import ray

log = logging.getLogger("shardlm")

# Settings of the Ray processes of a cluster this driver starts itself (they inherit its
# environment; one set by the user wins). Serve's controller reconciles every 0.1 s by
# default, about 1 s of CPU per 30 s of serving with its calls to the GCS: on 2 cores that
# came out of the workers' time (vLLM's client, 16 streams: controller 1.14 -> 0.41 s, GCS
# 0.73 -> 0.31 s). Once a second still restarts a dead replica within a second of Ray's
# noticing.
LOCAL_CLUSTER_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1"}


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
        for name, value in LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        log.info("started a local Ray instance")


def running_local_cluster(temp_dir: str | None = None) -> str | None:
    """The address of a Ray cluster running on this machine whose GCS answers, or None.

    Candidates are, in order, the cluster Ray last recorded in
    ``<temp dir>/ray_current_cluster`` and the GCS processes running here. After an unclean
    exit the file outlives its cluster, and ``ray.init(address="auto")`` then retries the
    dead address for minutes; a one-second TCP probe of each candidate skips it."""
    try:
        from ray._private.services import find_gcs_addresses
        from ray._private.utils import read_ray_address
    except ImportError:  # another Ray layout: let Ray look for itself
        return "auto"
    recorded = read_ray_address(temp_dir)
    for address in [recorded] + sorted(find_gcs_addresses()):
        if address and _answers(address):
            return address
        if address and address == recorded:
            log.warning("no Ray cluster answers at %s (recorded by a cluster that is gone)", address)
    return None


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False

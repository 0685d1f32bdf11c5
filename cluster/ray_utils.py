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
    """Join what Ray itself would join: the cluster at ``address`` (or $RAY_ADDRESS), or the
    one ``ray start`` last started on this machine while it answers; else start one of our
    own. Never another process's private cluster (an ``LLM`` in a script starts one that ends
    with it)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    local = running_local_cluster()
    if local:
        ray.init(address=local, log_to_driver=False)
        log.info("joined the Ray cluster `ray start` started at %s", local)
    else:  # "local": never the address file of a cluster that is gone
        for name, value in LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        log.info("started a local Ray instance")


def running_local_cluster(temp_dir: str | None = None) -> str | None:
    """The address of the cluster ``ray start`` recorded on this machine
    (``<temp dir>/ray_current_cluster``, as ``ray.init()`` reads it) while its GCS answers,
    else None. Other GCS processes running here are not candidates: they belong to clusters
    other drivers started for themselves. After an unclean exit the file outlives its
    cluster, and ``ray.init()`` would then retry the dead address for minutes; a one-second
    TCP probe skips it."""
    try:
        from ray._private.utils import read_ray_address
    except ImportError:  # another Ray layout: no recorded cluster to read; start our own
        return None
    recorded = read_ray_address(temp_dir)
    if recorded and _answers(recorded):
        return recorded
    if recorded:
        log.warning("no Ray cluster answers at %s (recorded by a cluster that is gone)", recorded)
    return None


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False

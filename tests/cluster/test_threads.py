"""A CPU worker uses its share of the node's cores by default (``threads_per_worker: null``):
the cores this machine lets a process run on, split over the gang's workers on the node;
an explicit number wins. Checked in the workers themselves (torch.get_num_threads)."""

from __future__ import annotations

import os

import pytest
import ray

from cluster import LLM
from tests.checkpoints import write_tiny_checkpoint

CORES = len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("threads"))


@pytest.mark.parametrize("tp,setting,expected", [
    (1, None, max(1, CORES)), (2, None, max(1, CORES // 2)), (1, 1, 1)])
def test_workers_take_their_share_of_the_cores(ray_session, tiny, tp, setting, expected):
    with LLM(dtype="float32", model=str(tiny), tensor_parallel_size=tp, cpus_per_worker=0.5,
             kv_cache_bytes=1 << 20, threads_per_worker=setting, name="threads",
             namespace="threads") as llm:
        group = llm.engine.group
        in_workers = [p["threads"] for p in ray.get([w.ping.remote() for w in group.workers])]
    assert group.threads == in_workers == [expected] * tp

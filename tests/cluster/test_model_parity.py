"""Whole-model parity: logits through shardlm's worker actors equal transformers' logits
for random tiny checkpoints written by transformers, at tp = 1..4 over gloo and shm.

9 query / 3 KV heads: tp=2 splits KV heads unevenly (2 + 1), tp=3 evenly, tp=4 replicates
KV heads (more ranks than KV heads)."""

from __future__ import annotations

import pytest

from cluster.contract.config import EngineConfig
from cluster.engine.worker_group import WorkerGroup
from tests.checkpoints import TINY_MODELS, hf_logits, write_tiny_checkpoint

PROMPTS = [[1, 5, 7, 9, 100, 3, 4, 150, 0, 12, 33], [8, 9, 10], [42]]
GROUPS = [(1, "gloo"), (2, "gloo"), (2, "shm"), (3, "gloo"), (3, "shm"), (4, "gloo"), (4, "shm")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name in TINY_MODELS:
        path = write_tiny_checkpoint(name, tmp_path_factory.mktemp(name))
        out[name] = (path, hf_logits(path, PROMPTS))
    return out


@pytest.mark.parametrize("tp,backend", GROUPS, ids=[f"tp{t}-{b}" for t, b in GROUPS])
def test_logits_match_transformers(ray_session, checkpoints, tp, backend):
    first = next(iter(checkpoints.values()))[0]
    config = EngineConfig().with_overrides(
        model=str(first), tensor_parallel_size=tp, backend=backend, cpus_per_worker=0.5,
        name=f"parity-tp{tp}-{backend}")
    group = WorkerGroup(config, first).start()
    try:
        for name, (path, expected) in checkpoints.items():
            if path != first:  # the same actors and communicators load the next checkpoint
                group.call_all("load", str(path), "float32")
            got = group.forward_logits(PROMPTS)
            assert got.shape == expected.shape, name
            diff = (got - expected).abs().max().item()
            assert diff < 1e-4, f"{name} at tp={tp} over {backend}: max abs diff {diff}"
    finally:
        group.shutdown()


def test_actors_are_named_and_laid_out(ray_session, checkpoints):
    import ray

    path = next(iter(checkpoints.values()))[0]
    config = EngineConfig().with_overrides(model=str(path), tensor_parallel_size=2,
                                           cpus_per_worker=0.5, name="layout")
    group = WorkerGroup(config, path).start()
    try:
        for tp_rank in (0, 1):  # found by name, as `ray list actors` shows them
            actor = ray.get_actor(f"layout-worker-0-{tp_rank}", namespace="shardlm")
            assert ray.get(actor.ping.remote())["pid"] == group.ranks[tp_rank].pid
        assert [(r["pp_rank"], r["tp_rank"]) for r in group.describe()] == [(0, 0), (0, 1)]
        assert group.backend == "shm"  # auto: both ranks on this one node
    finally:
        group.shutdown()

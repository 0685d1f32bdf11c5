"""Whole-model parity: logits through shardlm's worker actors equal transformers' logits
for random tiny checkpoints written by transformers, at tp = 1..4 over gloo and shm.

9 query / 3 KV heads: tp=2 splits KV heads unevenly (2 + 1), tp=3 evenly, tp=4 replicates
KV heads (more ranks than KV heads)."""

from __future__ import annotations

import pytest

from cluster.contract.config import EngineConfig
from cluster.engine.worker_group import WorkerGroup
from tests.checkpoints import MOE_MODELS, TINY_MODELS, hf_logits, write_tiny_checkpoint

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
    config = EngineConfig().with_overrides(dtype="float32", 
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


EP_GROUPS = [(2, "shm"), (3, "gloo"), (4, "shm")]


@pytest.mark.parametrize("tp,backend", EP_GROUPS, ids=[f"tp{t}-{b}" for t, b in EP_GROUPS])
def test_expert_parallel_logits_match_transformers(ray_session, checkpoints, tp, backend):
    """Whole experts per rank (5 experts: 3 + 2, 2 + 2 + 1, 2 + 1 + 1 + 1): the Mixture-of-
    Experts models' logits equal transformers' as with sliced experts."""
    first = checkpoints[MOE_MODELS[0]][0]
    config = EngineConfig().with_overrides(
        dtype="float32", model=str(first), tensor_parallel_size=tp, backend=backend,
        cpus_per_worker=0.5, enable_expert_parallel=True, name=f"ep-tp{tp}-{backend}")
    group = WorkerGroup(config, first).start()
    try:
        for name in MOE_MODELS:
            path, expected = checkpoints[name]
            if path != first:
                group.call_all("load", str(path), "float32")
            diff = (group.forward_logits(PROMPTS) - expected).abs().max().item()
            assert diff < 1e-4, f"{name} at ep={tp} over {backend}: max abs diff {diff}"
    finally:
        group.shutdown()


def test_actors_are_named_and_laid_out(ray_session, checkpoints):
    import ray

    path = next(iter(checkpoints.values()))[0]
    config = EngineConfig().with_overrides(dtype="float32", model=str(path), tensor_parallel_size=2,
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


# ---- through the paged KV cache: chunked prefill, then decode steps -----------------------
PAGED_GROUPS = [(1, "gloo"), (2, "shm"), (3, "gloo")]
BLOCK = 4
TOP = 5


def _chunk(seq_id, ids, start, table, sample, logprobs):
    """A chunk, and its sequence's sampling parameters (each plan sends them again: a
    worker takes a sequence's latest)."""
    from cluster.contract.messages import SamplerParams, SeqChunk, SeqParams

    return (SeqChunk(seq_id, ids, start, table, sample),
            SeqParams(seq_id, len(PROMPTS[seq_id]),
                      SamplerParams(temperature=0.0, seed=seq_id, logprobs=logprobs)))


PAGED_MODELS = ["llama-gqa", "qwen3", "phi3", "gemma2", "gemma3", *MOE_MODELS,
                *(f"{m}+ep" for m in MOE_MODELS)]  # +ep: whole experts per rank


# (expert parallelism needs two ranks or more: at tp=1 it is the sliced case)
PAGED_CASES = [(m, t, b) for m in PAGED_MODELS for t, b in PAGED_GROUPS
               if not (m.endswith("+ep") and t == 1)]


@pytest.mark.parametrize("model,tp,backend", PAGED_CASES,
                         ids=[f"{m}-tp{t}-{b}" for m, t, b in PAGED_CASES])
def test_paged_steps_match_transformers(ray_session, checkpoints, tp, backend, model):
    """The step protocol end to end: sequence 0's prompt prefilled in two chunks (the second
    attends over the first through the cache), the others in one, the steps mixing prefill
    and decode, then decode steps of one token each. Every sampled (greedy) token is
    transformers' argmax at that position, and the top logprobs of sequences 0 and 1 are
    transformers' log-softmax there; sequence 2 asks for none (the argmax-only path)."""
    import torch

    from cluster.contract.messages import StepPlan

    name, _, ep = model.partition("+")
    path, _ = checkpoints[name]
    config = EngineConfig().with_overrides(dtype="float32", 
        model=str(path), tensor_parallel_size=tp, backend=backend, cpus_per_worker=0.5,
        block_size=BLOCK, kv_cache_bytes=1 << 20, enable_expert_parallel=bool(ep),
        name=f"paged-{name}{'-ep' if ep else ''}-tp{tp}-{backend}")
    group = WorkerGroup(config, path).start()
    try:
        num_blocks = group.init_cache()
        # scattered, non-contiguous blocks per sequence, room for 24 tokens each
        tables = [list(range(num_blocks - 1 - s, -1, -3))[:6] for s in range(3)]
        logprobs = [TOP, TOP, None]
        seqs = [list(p) for p in PROMPTS]
        cut = 6  # sequence 0's first chunk
        steps = [[_chunk(0, seqs[0][:cut], 0, tables[0], False, TOP)]
                 + [_chunk(s, seqs[s], 0, tables[s], True, logprobs[s]) for s in (1, 2)],
                 [_chunk(0, seqs[0][cut:], cut, tables[0], True, TOP)]]
        results, sampled_last = [], {}
        for step_id in range(1, 8):
            chunks = steps[step_id - 1] if step_id <= len(steps) else []
            if step_id > 1:  # every sequence that sampled last step decodes its token now
                ready = {c.seq_id for c, _ in chunks}
                chunks = chunks + [_chunk(s, seqs[s][-1:], len(seqs[s]) - 1, tables[s], True,
                                          logprobs[s]) for s in range(3)
                                   if s not in ready and sampled_last.get(s)]
            result = group.collect(group.submit(StepPlan(
                step_id, [c for c, _ in chunks], [p for _, p in chunks]).encode()))
            sampled_last = {}
            for token in result.tokens:
                results.append((token.seq_id, len(seqs[token.seq_id]), token))
                seqs[token.seq_id].append(token.token_id)
                sampled_last[token.seq_id] = True
        reference = [torch.log_softmax(hf_logits(path, [s[:-1]]), dim=-1) for s in seqs]
        assert len(results) >= 3 * 5
        for seq_id, position, token in results:
            expected = reference[seq_id][position - 1]  # the distribution after `position` tokens
            assert token.token_id == int(expected.argmax()), (seq_id, position)
            if logprobs[seq_id] is None:
                assert token.logprob is None and token.top_logprobs is None
                continue
            assert abs(token.logprob - float(expected[token.token_id])) < 1e-4
            top_v, top_i = torch.topk(expected, TOP)
            assert [t for t, _ in token.top_logprobs] == top_i.tolist()
            assert max(abs(v - r) for (_, v), r in zip(token.top_logprobs, top_v.tolist())) < 1e-4
    finally:
        group.shutdown()

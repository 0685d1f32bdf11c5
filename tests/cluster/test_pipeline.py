"""Pipeline parallelism: stages own contiguous layers, hidden states go stage to stage, and
greedy outputs equal transformers `generate`; placement that cannot happen says why."""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.contract.config import EngineConfig
from cluster.engine.worker_group import PlacementError, WorkerGroup, stage_layer_ranges
from tests.checkpoints import write_tiny_checkpoint

PROMPTS = [[(11 * i + 5 * j) % 150 + 1 for j in range(n)] for i, n in enumerate([4, 13, 7, 21, 2, 9])]
LAYOUTS = [(1, 2, None), (2, 2, None), (1, 3, None), (1, 2, [1, 2])]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("llama-tied", tmp_path_factory.mktemp("pp-tiny"), seed=5,
                                 num_hidden_layers=3)


@pytest.fixture(scope="module")
def reference(tiny):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           max_new_tokens=24, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p in PROMPTS]


@pytest.mark.parametrize("tp,pp,split", LAYOUTS, ids=[f"tp{t}-pp{p}-{s}" for t, p, s in LAYOUTS])
def test_greedy_matches_transformers_and_stages_load_only_their_layers(
        ray_session, tiny, reference, tp, pp, split):
    llm = LLM(dtype="float32", model=str(tiny), tensor_parallel_size=tp, pipeline_parallel_size=pp,
              pipeline_layer_split=split, cpus_per_worker=0.5, block_size=4,
              kv_cache_bytes=1 << 22, name=f"pp-{tp}-{pp}")
    try:
        outputs = llm.generate(prompt_token_ids=PROMPTS,
                               sampling_params=SamplingParams(max_tokens=24, temperature=0))
        group = llm.engine.group
        ranges = stage_layer_ranges(3, pp, split)
        for info, stats in zip(group.ranks, group.load_stats):
            first, end = ranges[info.pp_rank]
            layers = {int(n.split(".")[1]) for n in stats["loaded"] if n.startswith("layers.")}
            assert layers == set(range(first, end)), (info.name, layers)
            assert ("embed_tokens.weight" in stats["loaded"]) == (info.pp_rank == 0)
            assert ("norm.weight" in stats["loaded"]) == (info.pp_rank == pp - 1)
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == reference


def test_micro_batching_keeps_outputs(ray_session, tiny, reference):
    """Several micro-batches in flight at pp=2 (and the same with it turned off)."""
    for depth in (2, 1):
        llm = LLM(dtype="float32", model=str(tiny), pipeline_parallel_size=2, pipeline_depth=depth,
                  cpus_per_worker=0.5, block_size=4, kv_cache_bytes=1 << 22, name=f"pp-depth{depth}")
        try:
            engine = llm.engine
            ids = [engine.add_request(prompt_token_ids=p, params=SamplingParams(max_tokens=24, temperature=0))
                   for p in PROMPTS]
            most_in_flight = 0
            while engine.has_unfinished():
                engine.step()
                most_in_flight = max(most_in_flight, len(engine.in_flight))
            assert [engine.pop_finished(i).outputs[0].token_ids for i in ids] == reference
            assert most_in_flight == depth - 1  # steps still in flight after one is collected
        finally:
            llm.shutdown()


def test_unplaceable_config_names_what_is_missing(ray_session, tiny):
    config = EngineConfig().with_overrides(dtype="float32", model=str(tiny), tensor_parallel_size=2,
                                           pipeline_parallel_size=2, cpus_per_worker=3.0,
                                           placement_timeout_s=3.0, name="too-big")
    with pytest.raises(PlacementError) as err:
        WorkerGroup(config, tiny).start()
    message = str(err.value)
    assert "within 3s" in message and "'CPU': 12.0" in message and "missing" in message


def test_bad_layer_split_is_named(tiny):
    with pytest.raises(ValueError, match=r"pipeline_layer_split=\[2, 2\] covers 4 layers"):
        stage_layer_ranges(3, 2, [2, 2])


def test_abort_while_a_micro_batch_is_in_flight(ray_session, tiny, reference):
    llm = LLM(dtype="float32", model=str(tiny), pipeline_parallel_size=2, cpus_per_worker=0.5, block_size=4,
              kv_cache_bytes=1 << 22, name="pp-abort")
    try:
        engine = llm.engine
        greedy = SamplingParams(max_tokens=24, temperature=0)
        ids = [engine.add_request(prompt_token_ids=p, params=greedy) for p in PROMPTS]
        for _ in range(3):
            engine.step()
        busy = {s.seq_id for out, _, _ in engine.in_flight for s in out.seqs}
        victim = next(i for i, r in enumerate(ids) if engine.requests[r].seqs[0].seq_id in busy)
        assert engine.abort(ids[victim])
        while engine.has_unfinished():
            engine.step()
        for i, request_id in enumerate(ids):
            if i != victim:
                assert engine.pop_finished(request_id).outputs[0].token_ids == reference[i]
        assert engine.block_manager.num_free_blocks == engine.num_blocks
        assert not engine.scheduler.running and not engine.scheduler.waiting
    finally:
        llm.shutdown()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_window_layers_across_stages(ray_session, tmp_path, family):
    """Gemma at pp=2: the sliding-window layer (0) on the first stage, the full one on the
    second, each keeping its own window and rotary; greedy output equals transformers'."""
    import transformers

    path = write_tiny_checkpoint(family, tmp_path, seed=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in PROMPTS]
    llm = LLM(dtype="float32", model=str(path), pipeline_parallel_size=2, cpus_per_worker=0.5,
              block_size=4, kv_cache_bytes=1 << 22, name=f"pp-{family}")
    try:
        outputs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(
            max_tokens=12, temperature=0, ignore_eos=True))
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == expected

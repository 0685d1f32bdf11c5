"""The engine on random tiny checkpoints: greedy parity with transformers `generate`,
continuous batching, preemption, prefix caching, seeded sampling, admission errors."""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.contract.errors import RequestError, RequestTypeError
from tests.checkpoints import write_tiny_checkpoint

# 8 prompts of different lengths (token ids; the tiny checkpoints have no tokenizer)
PROMPTS = [[(7 * i + 3 * j) % 150 + 1 for j in range(n)]
           for i, n in enumerate([3, 17, 5, 29, 1, 11, 40, 8])]
GREEDY = SamplingParams(max_tokens=32, temperature=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("engine-tiny"), seed=1)


@pytest.fixture(scope="module")
def reference(tiny):
    """transformers' greedy continuations, one prompt at a time."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    out = {}
    for p in PROMPTS:
        gen = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=32, do_sample=False, pad_token_id=0)
        out[tuple(p)] = gen[0, len(p):].tolist()
    return out


def _llm(path, tp, name, **overrides) -> LLM:
    return LLM(dtype="float32", model=str(path), tensor_parallel_size=tp, cpus_per_worker=0.5, name=name,
               block_size=4, kv_cache_bytes=overrides.pop("kv_cache_bytes", 1 << 22), **overrides)


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def llm(request, ray_session, tiny):
    engine = _llm(tiny, request.param, f"engine-tp{request.param}")
    yield engine
    engine.shutdown()


def test_greedy_matches_transformers_generate(llm, reference):
    outputs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    assert len(outputs) == len(PROMPTS)
    distinct = set()
    for prompt, out in zip(PROMPTS, outputs):
        completion = out.outputs[0]
        assert out.prompt_token_ids == prompt
        assert completion.token_ids == reference[tuple(prompt)], f"prompt of {len(prompt)} tokens"
        assert completion.finish_reason in ("stop", "length")
        distinct.update(completion.token_ids)
    assert len(distinct) > 20  # the random model's outputs vary, so the comparison means something


def test_async_scheduling_overlaps_steps_and_stops_at_the_same_token(llm, reference):
    """Async scheduling (the default): while a request decodes, step() returns with the next
    step already in flight; not behind its prompt step, after which the next step is planned
    once it is back (prompts arriving meanwhile join it). A stop token ends the request
    exactly where the reference has it; the follow-up step planned before that token was
    known comes back and is dropped."""
    engine = llm.engine
    assert engine.async_scheduling and engine.max_in_flight == 2
    prompt = PROMPTS[3]
    ref = reference[tuple(prompt)]
    stop = ref[12]
    end = ref.index(stop) + 1  # the first time the reference produces it
    generated = engine.stats["generation_tokens"]
    request_id = engine.add_request(prompt_token_ids=prompt, params=SamplingParams(
        max_tokens=32, temperature=0, stop_token_ids=[stop]))
    in_flight = []
    while engine.has_unfinished():
        engine.step()
        in_flight.append(len(engine.in_flight))
    out = engine.pop_finished(request_id).outputs[0]
    assert out.token_ids == ref[:end] and out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert engine.stats["generation_tokens"] - generated == end  # the dropped token not counted
    # nothing out after the prompt step, a step always out while decoding; the last call
    # only took back the dropped one
    assert in_flight == [0] + [1] * (end - 1) + [0]


def test_without_async_scheduling_one_step_at_a_time(ray_session, tiny, reference):
    llm = _llm(tiny, 1, "engine-sync", async_scheduling=False)
    try:
        engine = llm.engine
        assert not engine.async_scheduling and engine.max_in_flight == 1
        engine.add_request(prompt_token_ids=PROMPTS[1], params=GREEDY)
        tokens = []
        while engine.has_unfinished():
            tokens += [t for d in engine.step() for t in d.token_ids]
            assert not engine.in_flight
        assert tokens == reference[tuple(PROMPTS[1])]
    finally:
        llm.shutdown()


def test_requests_join_the_running_batch(llm, reference):
    engine = llm.engine
    before = engine.stats["mixed_steps"]
    first = [engine.add_request(prompt_token_ids=p, params=GREEDY) for p in PROMPTS[:3]]
    for _ in range(4):  # the first requests are decoding now
        engine.step()
    later = [engine.add_request(prompt_token_ids=p, params=GREEDY) for p in PROMPTS[3:]]
    while engine.has_unfinished():
        engine.step()
    assert engine.stats["mixed_steps"] > before  # a step carried both prefill and decode work
    for request_id, prompt in zip(first + later, PROMPTS):
        assert engine.pop_finished(request_id).outputs[0].token_ids == reference[tuple(prompt)]


def test_seeded_sampling_is_independent_of_batch_and_tp(llm, tiny):
    seeded = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=1234)
    alone = llm.generate(prompt_token_ids=[PROMPTS[1]], sampling_params=seeded)[0]
    mixed = [SamplingParams(max_tokens=10 + i, temperature=0.5 + 0.1 * i, seed=i) for i in range(7)]
    batch = llm.generate(prompt_token_ids=PROMPTS, sampling_params=mixed[:1] + [seeded] + mixed[1:])
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids
    other = LLM(dtype="float32", model=str(tiny), tensor_parallel_size=3 - llm.config.parallel.tensor_parallel_size,
                cpus_per_worker=0.5, name="engine-other-tp", block_size=4, kv_cache_bytes=1 << 22)
    try:
        again = other.generate(prompt_token_ids=[PROMPTS[1]], sampling_params=seeded)[0]
    finally:
        other.shutdown()
    assert again.outputs[0].token_ids == alone.outputs[0].token_ids
    unseeded = llm.generate(prompt_token_ids=[PROMPTS[1]] * 2, sampling_params=SamplingParams(
        max_tokens=24, temperature=0.8))
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


@pytest.mark.parametrize("request_args,param,kind,message", [
    ({"prompt": ""}, "prompt", "invalid_value", "prompt is empty"),
    ({"prompt": 42}, "prompt", "invalid_type", "prompt must be a string"),
    ({"prompt_token_ids": [5] * 300}, "prompt_token_ids", "context_length_exceeded",
     "the prompt has 300 tokens"),
    ({"prompt_token_ids": [5, 999]}, "prompt_token_ids", "invalid_value", "outside the vocabulary"),
    ({"prompt_token_ids": [5], "prompt": "both"}, "prompt_token_ids", "invalid_value",
     "exactly one of"),
    ({"prompt_token_ids": [5], "params": {"max_tokens": 0}}, "max_tokens", "invalid_value",
     "max_tokens"),
    ({"prompt_token_ids": [5], "params": {"max_tokens": "3"}}, "max_tokens", "invalid_type",
     "max_tokens"),
    ({"prompt_token_ids": [5], "params": {"temperature": -0.5}}, "temperature", "invalid_value",
     "temperature"),
    ({"prompt_token_ids": [5], "params": {"top_p": 0}}, "top_p", "invalid_value", "top_p"),
    ({"prompt_token_ids": [5], "params": {"top_p": 1.5}}, "top_p", "invalid_value", "top_p"),
    ({"prompt_token_ids": [5], "params": {"max_tokenz": 3}}, "max_tokenz", "unknown_parameter",
     "max_tokenz"),
    ({"prompt_token_ids": [5], "params": [1]}, "sampling_params", "invalid_type", "SamplingParams"),
    ({"prompt_token_ids": [5], "request_id": "taken"}, "request_id", "duplicate_request_id",
     "already in use"),
    ({"prompt_token_ids": [5] * 200, "params": {"max_tokens": 100}}, "max_tokens",
     "context_length_exceeded", "200 tokens and max_tokens is 100: 300 tokens, over the context"),
])
def test_bad_requests_fail_at_admission_and_disturb_nothing(llm, reference, request_args, param,
                                                             kind, message):
    """Each bad request goes to the engine's admission as a caller sends it (raw values, a
    dict of sampling parameters), fails there with a typed error naming the parameter and
    what is wrong, queues nothing, and the request already running finishes as before."""
    engine = llm.engine
    running = engine.add_request(prompt_token_ids=PROMPTS[0], params=GREEDY, request_id="taken")
    engine.step()
    queued = (len(engine.scheduler.waiting), len(engine.scheduler.running), len(engine.by_seq))
    with pytest.raises(RequestError, match=message) as info:
        engine.add_request(**request_args)
    assert (info.value.param, info.value.kind) == (param, kind)
    assert isinstance(info.value, RequestTypeError) == (kind == "invalid_type")
    assert set(engine.requests) == {running}
    assert (len(engine.scheduler.waiting), len(engine.scheduler.running), len(engine.by_seq)) == queued
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_finished(running).outputs[0].token_ids == reference[tuple(PROMPTS[0])]
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_max_tokens_none_fills_the_context(llm):
    """max_tokens None (what a chat request without one sends): as many tokens as the
    context leaves after the prompt, then "length"."""
    engine = llm.engine
    prompt = PROMPTS[6]  # 40 tokens
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_tokens=None, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == engine.max_model_len - len(prompt)
    assert out.finish_reason == "length"


def test_offline_llm_names_the_prompt_at_fault(llm):
    """LLM.generate checks every prompt before running any and says which one failed."""
    with pytest.raises(RequestError, match="prompt 1: prompt_token_ids hold ids outside") as info:
        llm.generate(prompt_token_ids=[PROMPTS[0], [5, 999]], sampling_params=GREEDY)
    assert info.value.param == "prompt_token_ids"
    assert not llm.engine.requests and not llm.engine.has_unfinished()


def test_preemption_keeps_outputs(ray_session, tiny, reference):
    # 24 blocks of 4 tokens cannot hold 8 sequences of up to 72 tokens: preemption must happen
    # (the driver's bookkeeping: one rank shows it as well as two, at half the steps' cost)
    # (the cache itself sized from memory: a small share, one worker takes all of it)
    small = _llm(tiny, 1, "engine-small-kv", kv_cache_bytes=None, kv_cache_memory_fraction=0.02,
                 max_num_seqs=8)
    try:
        small.engine.scheduler.block_manager.__init__(24, 4, True)  # shrink the driver's view of the cache
        outputs = small.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
        assert small.engine.scheduler.num_preemptions > 0
        for prompt, out in zip(PROMPTS, outputs):
            assert out.outputs[0].token_ids == reference[tuple(prompt)]
        assert small.engine.block_manager.num_free_blocks == 24
    finally:
        small.shutdown()


def test_prefix_cache_hits_and_keeps_outputs(llm, tiny):
    import transformers

    shared = list(range(10, 34))  # 24 tokens = 6 full blocks of 4
    prompts = [shared + [40 + i, 50 + i] for i in range(4)]
    bm = llm.engine.block_manager
    hits_before = bm.prefix_cache_hits
    first = llm.generate(prompt_token_ids=prompts[:1], sampling_params=GREEDY)
    rest = llm.generate(prompt_token_ids=prompts[1:], sampling_params=GREEDY)
    assert bm.prefix_cache_hits - hits_before >= 3 * 6  # every later prompt reused the 6 blocks
    assert rest[0].num_cached_tokens == 24
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, first + rest):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist()


def test_sampling_parameters_and_history_go_to_the_workers_once(ray_session, tiny):
    """A request whose sampling reads its tokens (a repetition penalty) and restricts them
    (allowed_token_ids) sends those parameters with its first plan only, and its tokens as
    they come: over a generation its plans outweigh a plain request's of the same length by
    about one copy of them, not one per step. Its greedy tokens equal transformers' with the
    same processors, also when its prompt comes from the prefix cache (the gang then gets
    the tokens before the first chunk). An engine of its own whose cache has fewer than 128
    blocks: every block id then packs in one byte, so block tables weigh the same whichever
    blocks each request gets."""
    llm = _llm(tiny, 1, "engine-plan-bytes", kv_cache_bytes=150_000)
    try:
        assert 76 <= llm.engine.num_blocks < 128, llm.engine.num_blocks  # two requests fit
        _plans_carry_parameters_once(llm, tiny)
    finally:
        llm.shutdown()


def _plans_carry_parameters_once(llm, tiny) -> None:
    import msgpack
    import transformers

    n = 120  # prompt tokens; ids below 128 pack in one byte each, so both prompts weigh alike
    heavy_prompt = [(5 * j) % 127 + 1 for j in range(n)]
    plain_prompt = [(3 * j + 7) % 127 + 1 for j in range(n)]
    allowed = list(range(1, 151, 2))
    heavy = SamplingParams(max_tokens=32, temperature=0, repetition_penalty=1.3,
                           allowed_token_ids=allowed)

    def plan_bytes(prompt, params):
        before = llm.engine.stats["plan_bytes"]
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0]
        return llm.engine.stats["plan_bytes"] - before, out

    plain, _ = plan_bytes(plain_prompt, SamplingParams(max_tokens=32, temperature=0,
                                                       ignore_eos=True))
    weighed, first = plan_bytes(heavy_prompt, heavy)
    assert len(first.outputs[0].token_ids) == 32
    once = len(msgpack.packb(allowed)) + len(msgpack.packb(heavy_prompt))
    assert weighed - plain < 2 * once, (weighed, plain, once)
    _, again = plan_bytes(heavy_prompt, heavy)  # from the prefix cache
    assert again.num_cached_tokens > 0

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ref = model.generate(torch.tensor([heavy_prompt]), max_new_tokens=32, do_sample=False,
                         pad_token_id=0, repetition_penalty=1.3,
                         prefix_allowed_tokens_fn=lambda batch, ids: allowed)
    expected = ref[0, n:].tolist()
    assert set(expected) <= set(allowed)
    assert first.outputs[0].token_ids == expected
    assert again.outputs[0].token_ids == expected

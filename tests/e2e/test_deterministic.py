"""Deterministic mode end to end on the default model (docs/ARCHITECTURE.md, "Deterministic
mode"): through ``LLM.generate``, a request's tokens and logprobs (every float, compared
with ``==``: they are the logits' log-softmax) are the same alone, among fifteen other
requests whose prompts share a small token budget with it (so its prompt is cut into other
chunks and its decode steps hold other rows, prompt chunks among them), and again from the
prefix cache. bfloat16 at tp=2 (the all-reduce between the ranks) and int8 at pp=2. Across
layouts: the default model at tp 1-4 and pp 2, a tiny Gemma 2 at tp 1, 2 and 4, a tiny
Mixture-of-Experts model at tp 1 and 3 and expert-parallel at tp 2. The layer-level comparisons of the logits themselves, per family and format, are
``tests/layers/test_determinism.py``; the faults, ``tests/cluster/test_failures.py`` and
``test_engine_restart.py``."""

from __future__ import annotations

import re

import pytest

from cluster import LLM, SamplingParams

pytestmark = pytest.mark.slow

TARGET = "Write a limerick about a cat who learned to play the piano. There once was"
OTHERS = [f"Question {i}: name {i % 5 + 2} animals that live in {place}."
          for i, place in enumerate(["the sea", "a forest", "the desert", "the Arctic", "a city",
                                     "a river", "the mountains", "a cave", "the jungle",
                                     "a farm", "the savanna", "a swamp", "an island", "the tundra"])]
GREEDY = SamplingParams(max_tokens=24, temperature=0, logprobs=5, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=11, logprobs=5,
                        ignore_eos=True)
# the paths after the logits: penalties and a bias, and a grammar's mask
PENALISED = SamplingParams(max_tokens=24, temperature=0.8, seed=5, logprobs=5, ignore_eos=True,
                           repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3,
                           logit_bias={279: -2.0, 260: 1.5})
CONSTRAINED = SamplingParams(max_tokens=24, temperature=0.8, seed=6, logprobs=5,
                             structured_outputs={"regex": r"[A-Z][a-z]+( [a-z]+){3,12}[.!]"})


def _choice(out) -> tuple[list[int], list[dict[int, float]]]:
    return out.outputs[0].token_ids, out.outputs[0].logprobs


@pytest.mark.parametrize("dtype,quantization,tp,pp", [("bfloat16", None, 2, 1), ("bfloat16", "int8", 1, 2)],
                         ids=["bf16-tp2", "int8-pp2"])
def test_a_request_is_the_same_alone_in_a_crowd_and_from_the_cache(ray_session, dtype, quantization, tp, pp):
    llm = LLM(dtype=dtype, quantization=quantization, deterministic=True, tensor_parallel_size=tp,
              pipeline_parallel_size=pp, cpus_per_worker=0.5, kv_cache_bytes=64 << 20,
              max_num_batched_tokens=40, name=f"deterministic-{quantization or dtype}")
    params = [GREEDY, SEEDED, PENALISED, CONSTRAINED]
    try:
        alone = [_choice(llm.generate([TARGET], p)[0]) for p in params]
        others = SamplingParams(max_tokens=20, temperature=0.7, seed=3, ignore_eos=True)
        crowd = llm.generate(OTHERS[:7] + [TARGET] * 4 + OTHERS[7:],
                             [others] * 7 + params + [others] * 7)
        again = [llm.generate([TARGET], p)[0] for p in params]
    finally:
        llm.shutdown()
    assert all(len(tokens) == 24 for tokens, _ in alone[:3])
    assert re.fullmatch(r"[A-Z][a-z]+( [a-z]+){3,12}[.!]", again[3].outputs[0].text)
    assert [_choice(out) for out in crowd[7:11]] == alone  # tokens and every logprob
    assert [_choice(out) for out in again] == alone
    assert all(out.num_cached_tokens > 0 for out in again)  # their prompts came from the cache


LAYOUT_PROMPTS = [TARGET, "The three laws of thermodynamics are", "def quicksort(items):",
                  "Paris is the capital of"]


def _layout_run(tp: int, pp: int, dtype: str = "bfloat16", quantization: str | None = None):
    llm = LLM(dtype=dtype, quantization=quantization, deterministic=True,
              tensor_parallel_size=tp, pipeline_parallel_size=pp, cpus_per_worker=0.5,
              kv_cache_bytes=64 << 20, name=f"det-layout-{tp}-{pp}")
    try:
        return [_choice(out) for out in llm.generate(LAYOUT_PROMPTS, [GREEDY, SEEDED] * 2)]
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def one_rank():
    return _layout_run(1, 1)


@pytest.mark.parametrize("tp,pp", [(2, 1), (3, 1), (4, 1), (1, 2)],
                         ids=["tp2", "tp3", "tp4", "pp2"])
def test_the_same_bits_at_every_tensor_and_pipeline_parallel_degree(ray_session, one_rank, tp, pp):
    """bf16, the default model (9 query heads on 3 KV heads: at tp=2 ranks hold 6 and 3, at
    tp=4 KV heads are replicated and the query heads split 2, 1, 3, 3): the row-parallel
    layers gather their inputs (every output one dot product over every input feature, as at
    tp=1), the pipeline stages hand over float32 hidden states. Tokens and logprobs equal
    tp=1's, bit for bit."""
    assert _layout_run(tp, pp) == one_rank


TINY_PROMPTS = [[(5 * i + 7 * j) % 150 + 1 for j in range(6 + 5 * i)] for i in range(4)]


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """Gemma 2 (windows of 4 keys, soft-capped scores and logits, sandwich norms) with widths
    the int8 kernel takes: 9 query heads of 16 on 3 KV heads, as the default model's split."""
    from tests.checkpoints import write_tiny_checkpoint

    return write_tiny_checkpoint("gemma2", tmp_path_factory.mktemp("det-gemma"), seed=4,
                                 hidden_size=144, intermediate_size=128)


def _tiny_run(checkpoint, name: str, **settings) -> list:
    """TINY_PROMPTS, greedy and seeded, through a deterministic LLM on a tiny checkpoint."""
    llm = LLM(model=str(checkpoint), deterministic=True, cpus_per_worker=0.5,
              kv_cache_bytes=16 << 20, block_size=4, name=name, **settings)
    try:
        outs = llm.generate(prompt_token_ids=TINY_PROMPTS, sampling_params=[GREEDY, SEEDED] * 2)
    finally:
        llm.shutdown()
    return [_choice(out) for out in outs]


@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_a_gemma_gives_the_same_bits_at_tp_1_2_and_4(ray_session, tiny_gemma, fmt):
    """The other formats across tensor-parallel degrees, on another family: tokens and
    logprobs of greedy and seeded requests at tp=2 and 4 equal tp=1's."""
    def run(tp: int):
        return _tiny_run(tiny_gemma, f"det-gemma-{fmt}-{tp}", tensor_parallel_size=tp,
                         dtype="float32" if fmt == "float32" else "bfloat16",
                         quantization="int8" if fmt == "int8" else None)

    one = run(1)
    assert all(len(tokens) == 24 for tokens, _ in one)
    assert run(2) == one
    assert run(4) == one


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """Qwen2-MoE: 5 experts of 26 intermediate features (slices of 9, 9 and 8 at tp=3), 2 per
    token renormalised, a gated shared expert, layer 1 dense; heads of 16."""
    from tests.checkpoints import write_tiny_checkpoint

    return write_tiny_checkpoint("qwen2-moe", tmp_path_factory.mktemp("det-moe"), seed=5,
                                 hidden_size=144, intermediate_size=128)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
def test_a_mixture_of_experts_gives_the_same_bits_at_every_layout(ray_session, tiny_moe, fmt):
    """Mixture-of-Experts across tensor-parallel degrees and both expert layouts: experts
    split by intermediate features over 3 ranks (unevenly), and whole experts per rank
    (expert parallel, 3 + 2 over 2 ranks). Tokens and logprobs equal tp=1's."""
    def run(tp: int, expert_parallel: bool = False):
        return _tiny_run(tiny_moe, f"det-moe-{fmt}-{tp}-{expert_parallel}", dtype=fmt,
                         tensor_parallel_size=tp, enable_expert_parallel=expert_parallel)

    one = run(1)
    assert all(len(tokens) == 24 for tokens, _ in one)
    assert run(3) == one
    assert run(2, expert_parallel=True) == one

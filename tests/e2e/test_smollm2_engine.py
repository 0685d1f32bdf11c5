"""The default model (SmolLM2-135M-Instruct, converted from its GGUF) through the engine:
greedy generations equal transformers `generate` at tp=1, tp=2 (uneven KV-head split),
tp=3 and pp=2, and the `shardlm generate` command answers a chat question."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.checkpoints.store import DEFAULT_MODEL, resolve_model

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
    "Water boils at",
    "The quick brown fox",
    "Explain photosynthesis in simple terms. Photosynthesis is",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def reference(model_dir):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        out.append(gen[0, ids.input_ids.shape[1]:].tolist())
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (3, 1), (1, 2)],
                         ids=["tp1", "tp2", "tp3", "tp1-pp2"])
def test_greedy_matches_transformers(ray_session, model_dir, reference, tp, pp):
    llm = LLM(dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp, cpus_per_worker=0.5,
              kv_cache_bytes=64 << 20, name=f"smollm2-tp{tp}-pp{pp}")
    try:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0))
    finally:
        llm.shutdown()
    for prompt, out, expected in zip(PROMPTS, outputs, reference):
        assert out.outputs[0].token_ids == expected, prompt
        text = llm.tokenizer.decode(expected, skip_special_tokens=True)
        assert out.outputs[0].text == text


def test_cli_answers_a_chat_question_at_tp2(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--tp", "2", "--chat", "--max-tokens", "32",
         "What is the capital of France? Answer in one word."],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


CHAT_PROMPT = ("<|im_start|>user\nWhat is the capital of France? One word.<|im_end|>\n"
               "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def penalized(model_dir):
    """(prompt, shardlm's SamplingParams fields, transformers' generate arguments, its greedy
    tokens) per case. The bias forbids the token plain greedy takes first and favours another;
    min_tokens outlasts the plain answer (both checked, so each case changes the output)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(prompt, **hf_args):
        ids = tokenizer(prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id, **hf_args)
        return gen[0, ids.input_ids.shape[1]:].tolist()

    first = generate("List three primary colors:")[0]
    assert len(generate(CHAT_PROMPT)) < 12
    fox = tokenizer.decode(generate("The quick brown fox")).split()
    bad = fox[1]  # a word plain greedy writes: banned, as it is and after a space
    bad_ids = [tokenizer(w, add_special_tokens=False).input_ids for w in (bad, " " + bad)]
    allowed = sorted(set(tokenizer(" red green blue yellow hot cold degrees Celsius 100 ,.",
                                   add_special_tokens=False).input_ids))
    cases = [
        ("Once upon a time, in a small village by the sea,", {"repetition_penalty": 1.3},
         {"repetition_penalty": 1.3}),
        ("List three primary colors:", {"logit_bias": {str(first): -100.0, "28": 4.0}},
         {"sequence_bias": {(first,): -100.0, (28,): 4.0}}),
        ("1, 2, 3, 4,", {"repetition_penalty": 0.8}, {"repetition_penalty": 0.8}),
        (CHAT_PROMPT, {"min_tokens": 12}, {"min_new_tokens": 12}),
        ("The quick brown fox", {"bad_words": [bad]}, {"bad_words_ids": bad_ids}),
        ("Water boils at", {"allowed_token_ids": allowed},
         {"prefix_allowed_tokens_fn": lambda batch, sent: allowed}),
    ]
    return [(prompt, ours, hf_args, generate(prompt, **hf_args)) for prompt, ours, hf_args in cases]


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_penalties_bias_and_min_tokens_match_transformers(ray_session, penalized, tp):
    """Greedy with vLLM's repetition penalty, a logit bias, min_tokens, bad words and allowed
    tokens, all the requests in one batch (each with its own parameters), against
    transformers' processors in `generate`; at tp=2 each rank holds half the vocabulary, so
    the logits are gathered and adjusted whole before the argmax."""
    llm = LLM(dtype="float32", tensor_parallel_size=tp, cpus_per_worker=0.5,
              kv_cache_bytes=64 << 20, name=f"smollm2-penalties-tp{tp}")
    try:
        outputs = llm.generate([p for p, _, _, _ in penalized], [
            SamplingParams(max_tokens=16, temperature=0, **ours) for _, ours, _, _ in penalized])
    finally:
        llm.shutdown()
    for (prompt, ours, _, expected), out in zip(penalized, outputs):
        assert out.outputs[0].token_ids == expected, (prompt, ours)
    assert len(outputs[3].outputs[0].token_ids) >= 12
    assert set(outputs[5].outputs[0].token_ids) <= set(penalized[5][1]["allowed_token_ids"])

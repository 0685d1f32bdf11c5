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

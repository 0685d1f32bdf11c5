"""Which checkpoints shardlm runs, and how each family's ``config.json`` becomes
:class:`layers.models.decoder.DecoderArgs`.

- Llama family: ``LlamaForCausalLM`` (Llama 2/3, SmolLM2), ``MistralForCausalLM``,
  ``Qwen2ForCausalLM`` (bias on q/k/v), ``Qwen3ForCausalLM`` (an RMSNorm over each query and
  key head), ``Phi3ForCausalLM`` (q/k/v and gate/up packed in the checkpoint).
- Gemma: ``Gemma2ForCausalLM`` and ``Gemma3ForCausalLM`` (text): norms scaling by 1 + w, a
  norm before and after attention and the MLP, embeddings scaled by sqrt(hidden), GELU
  (tanh) gate, sliding-window layers (``layer_types``, or the older every-other /
  ``sliding_window_pattern`` rule); Gemma 2 soft-caps attention scores and logits, Gemma 3
  normalises query and key heads and gives its sliding layers a rotary of their own.
- Mixture-of-Experts (:mod:`layers.moe`): ``MixtralForCausalLM``, ``Qwen3MoeForCausalLM``
  (per-head q/k norms), ``Qwen2MoeForCausalLM`` (a gated shared expert).
"""

from __future__ import annotations

from typing import Callable

from layers.models.decoder import DecoderArgs
from layers.rotary import RopeSpec

# architecture -> (bias on q/k/v, bias on o_proj): None means "read attention_bias"
_LLAMA_BIASES = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": None,
    "Phi3ForCausalLM": (False, False),
}
_QK_NORM = {"Qwen3ForCausalLM", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM"}  # a norm over each q and k head


def _common(hf: dict, arch: str) -> dict:
    """The fields every family reads the same way."""
    heads = hf["num_attention_heads"]
    _refuse_partial_rotary(hf)
    return dict(
        architecture=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), qk_norm=arch in _QK_NORM,
        mlp_bias=bool(hf.get("mlp_bias", False)))


def llama_args(hf: dict, arch: str) -> DecoderArgs:
    biases = _LLAMA_BIASES[arch] or (bool(hf.get("attention_bias", False)),) * 2
    return DecoderArgs(
        **_common(hf, arch), rope=RopeSpec.from_hf_config(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=biases[0], o_bias=biases[1], max_position_embeddings=_capped_context(hf))


def gemma_args(hf: dict, arch: str) -> DecoderArgs:
    gemma3 = arch == "Gemma3ForCausalLM"
    layers = hf["num_hidden_layers"]
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention (an embedding model) is not supported")
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
        raise ValueError(f"Gemma activation {activation!r} is not supported (gelu_pytorch_tanh is)")
    rope, local_rope = _gemma_ropes(hf, gemma3)
    bias = bool(hf.get("attention_bias", False))
    return DecoderArgs(
        **_common(hf, arch), rope=rope, local_rope=local_rope,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), qkv_bias=bias, o_bias=bias,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        activation="gelu_tanh", norm_plus_one=True, sandwich_norms=True,
        embed_scale=hf["hidden_size"] ** 0.5,
        attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        # Gemma 3's reference attention takes no cap even where its config names one; a
        # missing key means transformers' default for the family, an explicit null none
        attn_softcap=None if gemma3 else hf.get("attn_logit_softcapping", 50.0),
        final_softcap=hf.get("final_logit_softcapping", None if gemma3 else 30.0),
        sliding_window=hf.get("sliding_window", 4096),
        sliding_layers=tuple(t == "sliding_attention" for t in _layer_types(hf, layers, gemma3)))


def _layer_types(hf: dict, layers: int, gemma3: bool) -> list[str]:
    types = hf.get("layer_types")
    if types is None:  # older configs: Gemma 2 alternates, Gemma 3 has every n-th layer global
        period = int(hf.get("sliding_window_pattern", 6)) if gemma3 else 2
        types = ["sliding_attention" if (i + 1) % period else "full_attention"
                 for i in range(layers)]
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types {types!r}: expected {layers} entries of "
                         "'sliding_attention' or 'full_attention'")
    return list(types)


def _gemma_ropes(hf: dict, gemma3: bool) -> tuple[RopeSpec, RopeSpec | None]:
    """(the full-attention layers' rotary, the sliding layers' own or None). Gemma 3 configs
    give ``rope_parameters`` per layer type, or the older ``rope_theta`` (+ ``rope_scaling``)
    and ``rope_local_base_freq``."""
    params = hf.get("rope_parameters") or {}
    if not gemma3:
        return RopeSpec.from_hf_config(hf), None
    if "full_attention" in params:
        full = RopeSpec.from_hf_config({**hf, "rope_parameters": params["full_attention"],
                                        "rope_scaling": None})
        local = params.get("sliding_attention") or {"rope_theta": 10000.0}
        return full, RopeSpec.from_hf_config({**hf, "rope_parameters": local, "rope_scaling": None})
    full = RopeSpec.from_hf_config({"rope_theta": 1_000_000.0, **hf})
    local = {"rope_theta": float(hf.get("rope_local_base_freq", 10000.0))}
    return full, RopeSpec.from_hf_config({**hf, "rope_parameters": local, "rope_scaling": None})


def moe_args(hf: dict, arch: str) -> DecoderArgs:
    """Mixtral (every layer sparse, top-k weights renormalised), Qwen3-MoE and Qwen2-MoE
    (sparse every ``decoder_sparse_step`` layers except ``mlp_only_layers``, renormalised
    where ``norm_topk_prob``; Qwen2-MoE adds a gated shared expert and bias on q/k/v)."""
    dense = _common(hf, arch)
    layers = hf["num_hidden_layers"]
    experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
    if arch == "MixtralForCausalLM":
        sparse, inter, normalize, shared = (True,) * layers, hf["intermediate_size"], True, 0
    else:
        step, dense_only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
        sparse = tuple(i not in dense_only and experts > 0 and (i + 1) % step == 0
                       for i in range(layers))
        inter, normalize = hf["moe_intermediate_size"], bool(hf.get("norm_topk_prob", False))
        shared = hf.get("shared_expert_intermediate_size", 0) if arch == "Qwen2MoeForCausalLM" else 0
    qkv_bias = bool(hf.get("qkv_bias", True)) if arch == "Qwen2MoeForCausalLM" else bool(
        hf.get("attention_bias", False))
    if any(sparse) and experts < 1:
        raise ValueError(f"{arch}: sparse layers but no experts in the config")
    return DecoderArgs(
        **dense, rope=RopeSpec.from_hf_config(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
        o_bias=False, max_position_embeddings=_capped_context(hf), num_experts=experts,
        experts_per_token=hf["num_experts_per_tok"], moe_intermediate_size=inter,
        normalize_expert_weights=normalize, shared_expert_intermediate_size=shared,
        sparse_layers=sparse)


ARCHITECTURES: dict[str, Callable[[dict, str], DecoderArgs]] = {
    **{arch: llama_args for arch in _LLAMA_BIASES},
    "Gemma2ForCausalLM": gemma_args,
    "Gemma3ForCausalLM": gemma_args,
    "MixtralForCausalLM": moe_args,
    "Qwen3MoeForCausalLM": moe_args,
    "Qwen2MoeForCausalLM": moe_args,
}


def architecture_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    raise ValueError(f"architecture {archs!r} is not supported; supported: {sorted(ARCHITECTURES)}")


def model_args(hf: dict) -> DecoderArgs:
    """The model's shape and features, from its ``config.json``; unsupported checkpoints
    fail here with a clear error."""
    arch = architecture_of(hf)
    return ARCHITECTURES[arch](hf, arch)


def _refuse_partial_rotary(hf: dict) -> None:
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                    hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor {partial} is not supported (the rotary "
                         "embedding turns whole heads)")


def _capped_context(hf: dict) -> int:
    """Usable context of a Llama-family model: max positions, capped by an active sliding
    window (Mistral's; attention over a context no longer than the window is exactly full
    attention)."""
    length = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", True):
        length = min(length, window)
    return length

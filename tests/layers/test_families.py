"""Reading each family's config.json: the older and newer styles of a Gemma 3 config give the
same model, errors name what is not supported, and which models CUDA graphs may capture."""

from __future__ import annotations

import pytest
import torch

from layers.models import build_model, model_args
from workers.comm import TrivialCommunicator

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=7,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def test_gemma3_older_config_style_reads_as_transformers_does():
    """Hub checkpoints of Gemma 3 carry ``rope_theta``, ``rope_scaling``,
    ``rope_local_base_freq`` and ``sliding_window_pattern``; transformers turns them into
    ``layer_types`` and per-type ``rope_parameters``. Both spellings give the same args."""
    import transformers

    old = dict(SMALL, architectures=["Gemma3ForCausalLM"], rope_theta=1_000_000.0,
               rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_local_base_freq=10_000.0,
               sliding_window_pattern=3, sliding_window=16, query_pre_attn_scalar=8)
    converted = transformers.Gemma3TextConfig(**{k: v for k, v in old.items()
                                                 if k != "architectures"}).to_dict()
    converted["architectures"] = ["Gemma3ForCausalLM"]
    a, b = model_args(old), model_args(converted)
    assert a == b
    assert a.sliding_layers == (True, True, False, True, True, False, True)
    assert (a.rope.theta, a.rope.rope_type, a.rope.factor) == (1_000_000.0, "linear", 8.0)
    assert (a.local_rope.theta, a.local_rope.rope_type) == (10_000.0, "default")


@pytest.mark.parametrize("change,message", [
    (dict(hidden_activation="relu"), "activation 'relu'"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(layer_types=["sliding_attention"] * 3), "layer_types"),
    (dict(layer_types=["sliding_attention"] * 6 + ["chunked_attention"]), "layer_types"),
])
def test_unsupported_gemma_configs_say_why(change, message):
    config = dict(SMALL, architectures=["Gemma2ForCausalLM"], **change)
    with pytest.raises(ValueError, match=message):
        model_args(config)


def test_moe_config_needs_experts_per_token_within_the_experts():
    config = dict(SMALL, architectures=["MixtralForCausalLM"], num_local_experts=4,
                  num_experts_per_tok=5)
    with pytest.raises(ValueError, match="experts per token 5"):
        build_model(config, TrivialCommunicator(), torch.float32)


@pytest.mark.parametrize("arch,extra,safe", [
    ("LlamaForCausalLM", {}, True),
    ("Qwen3ForCausalLM", {}, True),  # per-head norms: plain tensor ops
    ("Gemma2ForCausalLM", {}, True),  # windows and caps: in the triton kernel
    ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2), False),  # routing
])
def test_which_models_cuda_graphs_may_capture(arch, extra, safe):
    model = build_model(dict(SMALL, architectures=[arch], **extra), TrivialCommunicator(),
                        torch.float32)
    assert model.graph_safe is safe

"""Rotary embedding against transformers' implementation, plain and Llama-3 scaled."""

from __future__ import annotations

import pytest
import torch

from layers.rotary import RopeSpec, RotaryEmbedding

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("scaling", [None, LLAMA3, {"rope_type": "linear", "factor": 4.0}])
def test_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=5e5, rope_scaling=scaling)
    positions = torch.tensor([0, 1, 7, 63, 64, 500, 3000])
    q, k = torch.randn(7, 4, 16), torch.randn(7, 2, 16)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    spec = RopeSpec.from_hf_config(config.to_dict())
    rotary = RotaryEmbedding(16, spec)
    got_q, got_k = q.clone(), k.clone()
    rotary.rotate_(positions, got_q)
    rotary.rotate_(positions, got_k)
    torch.testing.assert_close(got_q, ref_q[0].transpose(0, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_k, ref_k[0].transpose(0, 1), rtol=0, atol=1e-5)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="'yarn'"):
        RopeSpec.from_hf_config({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


@pytest.mark.parametrize("platform", ["cpu", "native"])
@pytest.mark.parametrize("head_dim", [16, 8])  # on the CPU path, 16: the C kernel; 8: torch
def test_rotate_in_place_on_fused_qkv_matches_transformers(head_dim, platform):
    """``rotate_`` turns the q and k heads of a fused (tokens, q + k + v heads, hd) buffer in
    place, leaving the v heads alone, on the CPU path and on the device-generic one."""
    from layers.ops import NATIVE
    from layers.platform import select_ops

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=5e5, rope_scaling=LLAMA3)
    positions = torch.tensor([0, 3, 64, 2999])
    heads = torch.randn(4, 4 + 2 + 2, head_dim)
    q, k, v = (t.clone() for t in heads.split([4, 2, 2], dim=1))
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    rotary = RotaryEmbedding(head_dim, RopeSpec.from_hf_config(config.to_dict()))
    rotary.ops = select_ops("cpu", torch.float32) if platform == "cpu" else NATIVE
    assert (rotary.ops is NATIVE) == (platform == "native")
    rotary.rotate_(positions, heads[:, :6])
    torch.testing.assert_close(heads[:, :4], ref_q[0].transpose(0, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(heads[:, 4:6], ref_k[0].transpose(0, 1), rtol=0, atol=1e-5)
    assert torch.equal(heads[:, 6:], v)

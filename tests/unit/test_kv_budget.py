"""How a worker sizes its KV cache: on a GPU, what gpu_memory_utilization leaves after the
memory in use and the activations' peak of a profiling forward pass (as vLLM sizes it)."""

from __future__ import annotations

import pytest
import torch

from layers.models import build_model
from workers import kv_cache
from workers.comm import TrivialCommunicator
from workers.worker import profile_forward

GIB = 1 << 30


def test_gpu_budget_counts_memory_in_use_and_the_activation_peak():
    # 80 GiB GPU at 0.9: 72 GiB allowed; 16 GiB in use (weights, context); activations peak
    # 3 GiB above the 15 GiB allocated before the profile -> 53 GiB for the KV cache
    assert kv_cache.gpu_budget(80 * GIB, 64 * GIB, 15 * GIB, 18 * GIB, 0.9) == 53 * GIB
    # another process holding memory counts too: 10 GiB less free, 10 GiB less cache
    assert kv_cache.gpu_budget(80 * GIB, 54 * GIB, 15 * GIB, 18 * GIB, 0.9) == 43 * GIB


def test_gpu_budget_that_leaves_nothing_names_the_figures():
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0\.2 .*16\.00 GiB .*in use"):
        kv_cache.gpu_budget(80 * GIB, 64 * GIB, 15 * GIB, 18 * GIB, 0.2)


def test_profile_forward_runs_the_largest_step_without_a_cache():
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
              "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128}
    model = build_model(config, TrivialCommunicator(), torch.float32)
    calls = []
    model.lm_head.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    with torch.inference_mode():
        profile_forward(model, None, tokens=100, seqs=7, device=torch.device("cpu"))
    assert calls == [torch.Size([7, 32])]  # logits for one row per sequence
    assert kv_cache.blocks_that_fit(model, 16, torch.float32, -5) == 0

"""Fixtures of the end-to-end tests: the default model in transformers, their reference."""

from __future__ import annotations

import pytest
import torch

from cluster.checkpoints.store import DEFAULT_MODEL, resolve_model


@pytest.fixture(scope="module")
def hf():
    """(tokenizer, model) of the default model in transformers, float32: the reference the
    served outputs are compared with."""
    import transformers

    model_dir = resolve_model(DEFAULT_MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tokenizer, model

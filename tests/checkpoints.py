"""Random tiny checkpoints written by Hugging Face transformers (the reference)."""

from __future__ import annotations

from pathlib import Path

import torch

# name -> (config class, config kwargs); 9 query / 3 KV heads like SmolLM2, so tp=2 splits
# the KV heads unevenly and tp=4 replicates them.
TINY_MODELS = {
    "llama-gqa": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "qwen2-bias": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    # q/k norms, and a head_dim that is not hidden / heads
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=16)),
    # q/k/v and gate/up packed into one tensor each in the checkpoint
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False, pad_token_id=0)),
}

BASE = dict(vocab_size=151, hidden_size=72, intermediate_size=97, num_hidden_layers=2,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256,
            initializer_range=0.2, rms_norm_eps=1e-6)


def write_tiny_checkpoint(name: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised transformers model; returns its directory."""
    import transformers

    config_cls, extra = TINY_MODELS[name]
    config = getattr(transformers, config_cls)(**(BASE | extra | overrides))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory)
    return directory


def hf_logits(directory: Path, token_ids: list[list[int]]) -> torch.Tensor:
    """transformers' logits for each sequence, concatenated: (tokens, vocab)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return torch.cat([model(torch.tensor([ids])).logits[0] for ids in token_ids])

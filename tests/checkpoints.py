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
    # sandwich norms of 1 + w, scaled embeddings, GELU gate; layer 0 attends over a window of
    # 4 keys, layer 1 over all; scores and logits soft-capped at values that bite
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=4,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                    pad_token_id=0)),
    # q/k norms, a rotary of its own (theta 10^4) for the sliding layer, linear rope scaling
    # on the global one
    "gemma3": ("Gemma3TextConfig", dict(
        head_dim=16, query_pre_attn_scalar=12, sliding_window=4, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=3.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    # Mixture-of-Experts: 5 experts (3 + 2 on two ranks, 2 + 2 + 1 on three), 2 per token,
    # renormalised; every layer sparse
    "mixtral": ("MixtralConfig", dict(tie_word_embeddings=False, num_local_experts=5,
                                      num_experts_per_tok=2)),
    # q/k norms, experts of 26 features (uneven slices at tp 3 and 4), weights not
    # renormalised
    "qwen3-moe": ("Qwen3MoeConfig", dict(tie_word_embeddings=False, head_dim=16, num_experts=5,
                                         num_experts_per_tok=2, moe_intermediate_size=26,
                                         norm_topk_prob=False)),
    # a gated shared expert beside the routed ones; layer 1 dense (mlp_only_layers)
    "qwen2-moe": ("Qwen2MoeConfig", dict(tie_word_embeddings=False, num_experts=5,
                                         num_experts_per_tok=2, moe_intermediate_size=26,
                                         shared_expert_intermediate_size=40, norm_topk_prob=True,
                                         mlp_only_layers=[1])),
}
MOE_MODELS = ("mixtral", "qwen3-moe", "qwen2-moe")
# models whose norm weights are randomised too (their initial values, 0 for 1 + w, would hide
# a norm read wrongly)
RANDOM_NORMS = {"gemma2", "gemma3"}

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
    if name in RANDOM_NORMS:
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith("norm.weight"):
                    param.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    return directory


def hf_logits(directory: Path, token_ids: list[list[int]]) -> torch.Tensor:
    """transformers' logits for each sequence, concatenated: (tokens, vocab)."""
    import transformers

    # experts one by one (the reference loop; the grouped kernel wants 16-byte strides)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              experts_implementation="eager")
    model.eval()
    with torch.no_grad():
        return torch.cat([model(torch.tensor([ids])).logits[0] for ids in token_ids])


def write_word_tokenizer(directory: Path, vocab_size: int = BASE["vocab_size"]) -> Path:
    """A tokenizer for a tiny checkpoint: token i is the word ``w<i>`` (words split on
    whitespace, decoded joined by spaces), so a generation's text names its token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(directory)
    return directory

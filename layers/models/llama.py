"""The Llama family built from tensor-parallel layers.

Covers Llama 2/3, Mistral, Qwen2 (bias on q/k/v), Qwen3 (an RMSNorm over each query and
key head before the rotary embedding), Phi-3 (q/k/v and gate/up each one tensor in the
checkpoint: every rank reads its rows of each part) and SmolLM2 (tied embeddings), picked by
the checkpoint's ``config.json`` ``architectures``. A model instance
is one rank's piece: its TP share of every weight and, under pipeline
parallelism, only the layers of its stage (the first stage owns the embedding,
the last the final norm and LM head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
import torch
from torch import nn

from layers.attention import Attention, AttnBatch, KeepRows
from layers.embedding import ParallelLMHead, VocabParallelEmbedding
from layers.linear import QKVParallelLinear, RowParallelLinear
from layers.mlp import SwiGLUMLP
from layers.norm import RMSNorm
from layers.ops import NATIVE
from layers.parallel import TensorParallelGroup
from layers.partition import HeadShard, head_shard
from layers.rotary import RopeSpec, RotaryEmbedding

# architecture -> (bias on q/k/v, bias on o_proj): None means "read attention_bias"
ARCHITECTURES = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": None,
    "Phi3ForCausalLM": (False, False),
}
QK_NORM = {"Qwen3ForCausalLM"}  # architectures that normalise each q and k head


@dataclass(frozen=True)
class LlamaArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_position_embeddings: int
    qk_norm: bool = False

    @classmethod
    def from_hf_config(cls, hf: dict) -> "LlamaArgs":
        arch = architecture_of(hf)
        biases = ARCHITECTURES[arch] or (bool(hf.get("attention_bias", False)),) * 2
        partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                        hf.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor {partial} is not supported (the rotary "
                             "embedding turns whole heads)")
        heads = hf["num_attention_heads"]
        return cls(
            architecture=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope=RopeSpec.from_hf_config(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=biases[0], o_bias=biases[1], mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=_context_len(hf), qk_norm=arch in QK_NORM)


def architecture_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    raise ValueError(f"architecture {archs!r} is not supported; supported: {sorted(ARCHITECTURES)}")


def _context_len(hf: dict) -> int:
    """Usable context: max positions, capped by an active sliding window (attention over a
    context no longer than the window is exactly full attention)."""
    length = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", True):
        length = min(length, window)
    return length


class LlamaAttention(nn.Module):
    def __init__(self, args: LlamaArgs, shard: HeadShard, dtype: torch.dtype, comm: TensorParallelGroup,
                 rotary: RotaryEmbedding | None = None):
        super().__init__()
        hd = args.head_dim
        self.num_q, self.num_kv, self.head_dim = shard.num_q, shard.num_kv, hd
        self.qkv_proj = QKVParallelLinear(args.hidden_size, hd, shard, args.qkv_bias, dtype)
        self.rotary = rotary or RotaryEmbedding(hd, args.rope)  # the model shares one
        self.attn = Attention(shard.num_q, shard.num_kv, hd)
        self.o_proj = RowParallelLinear(shard.q_start * hd, shard.num_q * hd, args.hidden_size,
                                        args.o_bias, dtype, comm)
        self.qk_norm = args.qk_norm  # Qwen3: one RMSNorm weight (head_dim,) for every q head,
        if args.qk_norm:  # one for every k head, replicated on every rank
            self.q_norm = RMSNorm(hd, args.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(hd, args.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttnBatch,
                keep: KeepRows | None = None) -> torch.Tensor:
        # x: (tokens, hidden) -> (tokens, hidden), or (kept rows, hidden) with ``keep``
        qkv = self.qkv_proj.project(x)  # (tokens, (local_q + 2 * local_kv) * hd)
        heads = qkv.view(qkv.shape[0], -1, self.head_dim)  # (tokens, local_q + 2 * local_kv, hd)
        if self.qk_norm:
            self._norm_heads(heads)
        self.rotary.rotate_(positions, heads[:, :self.num_q + self.num_kv])  # q and k, in place
        q, k, v = heads.split([self.num_q, self.num_kv, self.num_kv], dim=1)  # (tokens, heads, hd) each
        if keep is None:
            return self.o_proj(self.attn(q, k, v, batch))
        q_last = q.index_select(0, keep.rows)  # (kept rows, local_q, hd)
        return self.o_proj(self.attn.forward_last(q_last, k, v, batch, batch.last_tokens(keep.seqs)))


    def _norm_heads(self, heads: torch.Tensor) -> None:
        """Qwen3's RMSNorm of each query and key head, in place.
        heads: (tokens, local_q + 2 * local_kv, hd)"""
        tokens, q, kv = heads.shape[0], self.num_q, self.num_kv
        for norm, part in ((self.q_norm, heads[:, :q]), (self.k_norm, heads[:, q:q + kv])):
            if part.shape[1]:
                part.copy_(norm(part.reshape(-1, self.head_dim)).view(tokens, -1, self.head_dim))


class DecoderLayer(nn.Module):
    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, args: LlamaArgs, shard: HeadShard, dtype: torch.dtype, comm: TensorParallelGroup,
                 rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(args, shard, dtype, comm, rotary)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.mlp = SwiGLUMLP(args.hidden_size, args.intermediate_size, dtype, comm, args.mlp_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttnBatch,
                keep: KeepRows | None = None) -> torch.Tensor:
        # x: (tokens, hidden) -> (tokens, hidden), or (kept rows, hidden) with ``keep``
        cached = self.self_attn.attn.kv_cache is not None
        # (the fused decode layer has no q/k norms: Qwen3 runs op by op)
        if keep is None and cached and not self.self_attn.qk_norm and batch.split().decode is batch:
            # every sequence decodes one token: the platform may run the layer whole
            fused = self.ops.fused_decode(self, x, positions, batch)
            if fused is not None:
                return fused
        attn = self.self_attn(self.input_layernorm(x), positions, batch, keep)
        return self.mlp_half(attn, x if keep is None else x.index_select(0, keep.rows))

    def mlp_half(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # attn, residual: (rows, hidden) -> (rows, hidden): residual add, norm, MLP, add
        normed, h = self.post_attention_layernorm.forward_add(attn, residual)
        return h + self.mlp(normed)


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: LlamaArgs, comm: TensorParallelGroup, dtype: torch.dtype = torch.float32,
                 layer_range: tuple[int, int] | None = None):
        super().__init__()
        self.args = args
        self.dtype = dtype
        self.layer_range = layer_range or (0, args.num_layers)
        first, end = self.layer_range
        self.is_first, self.is_last = first == 0, end == args.num_layers
        self.head_shard = head_shard(args.num_heads, args.num_kv_heads, comm.world_size, comm.rank)
        if self.is_first:
            self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, dtype, comm)
        rotary = RotaryEmbedding(args.head_dim, args.rope)  # one for all layers: angles once a step
        self.layers = nn.ModuleDict({str(i): DecoderLayer(args, self.head_shard, dtype, comm, rotary)
                                     for i in range(first, end)})
        if self.is_last:
            self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
            tied = self.embed_tokens if args.tie_word_embeddings and self.is_first else None
            self.lm_head = ParallelLMHead(args.vocab_size, args.hidden_size, dtype, comm, tied)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, batch: AttnBatch,
                keep: KeepRows | None = None) -> torch.Tensor:
        """inputs: token ids (tokens,) on the first stage, else hidden states (tokens, hidden)
        -> hidden states (tokens, hidden). On the last stage with ``keep`` (a KV cache
        present), the final layer still writes every token's keys and values but computes
        the rest only for the kept rows: -> (kept rows, hidden)."""
        x = self.embed_tokens(inputs) if self.is_first else inputs  # (tokens, hidden)
        layers = list(self.layers.values())
        for i, layer in enumerate(layers):
            final = keep is not None and self.is_last and i == len(layers) - 1
            x = layer(x, positions, batch, keep if final else None)
        return self.norm(x) if self.is_last else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # hidden: (rows, hidden) -> (rows, vocab) on TP rank 0, None on the other ranks
        return self.lm_head(hidden)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # hidden: (rows, hidden) -> argmax token ids (rows,) on TP rank 0, None elsewhere
        return self.lm_head.greedy(hidden)

    def checkpoint_targets(self, name: str) -> list[tuple]:
        """Which of this rank's parameters (name, shard id) a checkpoint tensor feeds; a
        third element is the shard's first row in a packed tensor."""
        if name == "model.embed_tokens.weight":
            targets = [("embed_tokens.weight", None)] if self.is_first else []
            if self.is_last and self.args.tie_word_embeddings and not self.is_first:
                targets.append(("lm_head.weight", None))
            return targets
        if name == "lm_head.weight":
            return [] if self.args.tie_word_embeddings or not self.is_last else [(name, None)]
        if name == "model.norm.weight":
            return [("norm.weight", None)] if self.is_last else []
        return self._layer_target(name)

    def _layer_target(self, name: str) -> list[tuple]:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if not m or not self.layer_range[0] <= int(m.group(1)) < self.layer_range[1]:
            return []
        index, module, kind = m.groups()
        fused = _FUSED.get(module)
        if fused:
            return [(f"layers.{index}.{fused[0]}.{kind}", fused[1])]
        if module in _PACKED:  # Phi-3: one checkpoint tensor for several of our shards
            return [(f"layers.{index}.{module}.{kind}", shard, offset)
                    for shard, offset in self._packed_offsets(module)]
        return [(f"layers.{index}.{module}.{kind}", None)]

    def _packed_offsets(self, module: str) -> list[tuple[str, int]]:
        """Each shard's first row in a packed checkpoint tensor (q, k, v or gate, up)."""
        a = self.args
        if module == "self_attn.qkv_proj":
            q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
            return [("q", 0), ("k", q), ("v", q + kv)]
        return [("gate", 0), ("up", a.intermediate_size)]


# checkpoints that pack q/k/v and gate/up into one tensor each (Phi-3), under our names
_PACKED = {"self_attn.qkv_proj", "mlp.gate_up_proj"}
# checkpoint module -> (our fused module, shard id)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
}

"""The decoder-only transformer every supported family is built from.

One set of blocks, configured by :class:`DecoderArgs` (which
:mod:`layers.models.families` reads from a checkpoint's ``config.json``):

- attention over this rank's heads (:class:`SelfAttention`): fused q/k/v projection, optional
  bias, optional RMSNorm of each query and key head (Qwen3, Gemma 3), rotary embedding (a
  second one for sliding-window layers where the family has it: Gemma 3), sliding-window
  layers, soft-capped scores and a scale of its own (Gemma 2);
- a gated MLP, SiLU or tanh-GELU (:class:`layers.mlp.GatedMLP`);
- the layer around them: pre-norm (:class:`DecoderLayer`: Llama, Mistral, Qwen, Phi-3) or
  sandwich norms, a norm before and after each of attention and the MLP
  (:class:`SandwichDecoderLayer`: Gemma 2 and 3);
- the model (:class:`CausalLM`): embedding (optionally scaled), layers, final norm,
  vocabulary-parallel LM head (optionally tied, optionally soft-capped logits).

A model instance is one rank's piece: its TP share of every weight and, under pipeline
parallelism, only the layers of its stage (the first stage owns the embedding, the last the
final norm and LM head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from layers.attention import Attention, AttnBatch, KeepRows
from layers.embedding import ParallelLMHead, VocabParallelEmbedding
from layers.linear import QKVParallelLinear, RowParallelLinear
from layers.mlp import GatedMLP
from layers.moe import MoE
from layers.norm import RMSNorm
from layers.ops import NATIVE
from layers.parallel import TensorParallelGroup
from layers.partition import HeadShard, head_shard
from layers.rotary import RopeSpec, RotaryEmbedding


@dataclass(frozen=True)
class DecoderArgs:
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
    qk_norm: bool = False  # an RMSNorm over each query and key head
    activation: str = "silu"  # the MLP's gate: "silu" or "gelu_tanh"
    norm_plus_one: bool = False  # norms scale by 1 + w (Gemma)
    sandwich_norms: bool = False  # a norm before and after attention and the MLP (Gemma)
    embed_scale: float | None = None  # the embeddings multiplied by it (Gemma: sqrt(hidden))
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # attention scores soft-capped (Gemma 2)
    final_softcap: float | None = None  # logits soft-capped (Gemma 2)
    sliding_window: int | None = None  # the window of the sliding layers
    sliding_layers: tuple[bool, ...] = ()  # per layer: attends over the window only
    local_rope: RopeSpec | None = None  # the sliding layers' rotary, where it differs (Gemma 3)
    # Mixture-of-Experts (layers.moe): the experts of the sparse layers, the others dense
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    normalize_expert_weights: bool = True  # the top-k weights renormalised to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    sparse_layers: tuple[bool, ...] = ()  # per layer: a Mixture-of-Experts block

    def window(self, layer: int) -> int | None:
        sliding = self.sliding_layers and self.sliding_layers[layer]
        return self.sliding_window if sliding else None

    def sparse(self, layer: int) -> bool:
        return bool(self.sparse_layers and self.sparse_layers[layer])


def feed_forward(args: DecoderArgs, layer: int, dtype: torch.dtype, comm: TensorParallelGroup,
                 expert_parallel: bool) -> nn.Module:
    """Layer ``layer``'s MLP: a Mixture-of-Experts block where the model has one there."""
    if not args.sparse(layer):
        return GatedMLP(args.hidden_size, args.intermediate_size, dtype, comm, args.mlp_bias,
                        args.activation)
    return MoE(args.hidden_size, args.moe_intermediate_size, args.num_experts,
               args.experts_per_token, args.normalize_expert_weights, dtype, comm,
               expert_parallel, args.shared_expert_intermediate_size)


class SelfAttention(nn.Module):
    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, args: DecoderArgs, shard: HeadShard, dtype: torch.dtype,
                 comm: TensorParallelGroup, rotary: RotaryEmbedding, window: int | None = None):
        super().__init__()
        hd = args.head_dim
        self.num_q, self.num_kv, self.head_dim = shard.num_q, shard.num_kv, hd
        self.qkv_proj = QKVParallelLinear(args.hidden_size, hd, shard, args.qkv_bias, dtype)
        self.rotary = rotary  # shared by the layers of a kind: angles once a step
        self.attn = Attention(shard.num_q, shard.num_kv, hd, args.attn_scale, window,
                              args.attn_softcap)
        shards = [head_shard(args.num_heads, args.num_kv_heads, comm.world_size, r)
                  for r in range(comm.world_size)]  # every rank's query heads: o_proj's inputs
        self.o_proj = RowParallelLinear([(s.q_start * hd, s.num_q * hd) for s in shards],
                                        args.hidden_size, args.o_bias, dtype, comm)
        self.qk_norm = args.qk_norm  # one RMSNorm weight (head_dim,) for every q head, one for
        if args.qk_norm:  # every k head, replicated on every rank
            self.q_norm = RMSNorm(hd, args.rms_norm_eps, dtype, args.norm_plus_one)
            self.k_norm = RMSNorm(hd, args.rms_norm_eps, dtype, args.norm_plus_one)

    @property
    def plain(self) -> bool:
        """No per-head norms, full uncapped attention: what the fused C decode layer runs."""
        return not self.qk_norm and self.attn.plain

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttnBatch,
                keep: KeepRows | None = None) -> torch.Tensor:
        # x: (tokens, hidden) -> (tokens, hidden), or (kept rows, hidden) with ``keep``
        # (tokens, (local_q + 2 * local_kv) * hd), in the platform's choice for this step
        qkv = self.qkv_proj.project(x, self.ops.attention_dtype(self, batch))
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
        """The RMSNorm of each query and key head, in place.
        heads: (tokens, local_q + 2 * local_kv, hd)"""
        tokens, q, kv = heads.shape[0], self.num_q, self.num_kv
        for norm, part in ((self.q_norm, heads[:, :q]), (self.k_norm, heads[:, q:q + kv])):
            if part.shape[1]:
                part.copy_(norm(part.reshape(-1, self.head_dim)).view(tokens, -1, self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm: x + attn(norm(x)), then h + mlp(norm(h))."""

    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, args: DecoderArgs, index: int, shard: HeadShard, dtype: torch.dtype,
                 comm: TensorParallelGroup, rotary: RotaryEmbedding, expert_parallel: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.self_attn = SelfAttention(args, shard, dtype, comm, rotary, args.window(index))
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.mlp = feed_forward(args, index, dtype, comm, expert_parallel)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttnBatch,
                keep: KeepRows | None = None) -> torch.Tensor:
        # x: (tokens, hidden) -> (tokens, hidden), or (kept rows, hidden) with ``keep``
        cached = self.self_attn.attn.kv_cache is not None
        # (the fused decode layer covers plain attention and a dense SwiGLU MLP only)
        if (keep is None and cached and self.self_attn.plain and isinstance(self.mlp, GatedMLP)
                and self.mlp.activation == "silu" and batch.split().decode is batch):
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


class SandwichDecoderLayer(nn.Module):
    """Gemma's layer: x + norm(attn(norm(x))), then h + norm(mlp(norm(h))); the norms scale
    by 1 + w."""

    def __init__(self, args: DecoderArgs, index: int, shard: HeadShard, dtype: torch.dtype,
                 comm: TensorParallelGroup, rotary: RotaryEmbedding, expert_parallel: bool = False):
        super().__init__()
        norm = lambda: RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, args.norm_plus_one)
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = SelfAttention(args, shard, dtype, comm, rotary, args.window(index))
        self.mlp = feed_forward(args, index, dtype, comm, expert_parallel)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttnBatch,
                keep: KeepRows | None = None) -> torch.Tensor:
        # x: (tokens, hidden) -> (tokens, hidden), or (kept rows, hidden) with ``keep``
        attn = self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), positions, batch, keep))
        residual = x if keep is None else x.index_select(0, keep.rows)
        normed, h = self.pre_feedforward_layernorm.forward_add(attn, residual)
        return h + self.post_feedforward_layernorm(self.mlp(normed))


class CausalLM(nn.Module):
    def __init__(self, args: DecoderArgs, comm: TensorParallelGroup, dtype: torch.dtype = torch.float32,
                 layer_range: tuple[int, int] | None = None, expert_parallel: bool = False):
        """``expert_parallel``: Mixture-of-Experts layers hold whole experts per rank instead
        of a slice of every expert (:mod:`layers.moe`)."""
        super().__init__()
        self.args = args
        self.dtype = dtype
        self.layer_range = layer_range or (0, args.num_layers)
        first, end = self.layer_range
        self.is_first, self.is_last = first == 0, end == args.num_layers
        self.head_shard = head_shard(args.num_heads, args.num_kv_heads, comm.world_size, comm.rank)
        if self.is_first:
            self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, dtype, comm)
            # the scale rounded to the weights' dtype, as the reference multiplies by it
            self.embed_scale = (None if args.embed_scale is None
                                else torch.tensor(args.embed_scale, dtype=dtype).item())
        # one rotary per kind of layer, shared: the angles of a step are computed once
        rotary = RotaryEmbedding(args.head_dim, args.rope)
        local = RotaryEmbedding(args.head_dim, args.local_rope) if args.local_rope else rotary
        layer_cls = SandwichDecoderLayer if args.sandwich_norms else DecoderLayer
        self.layers = nn.ModuleDict({
            str(i): layer_cls(args, i, self.head_shard, dtype, comm,
                              local if args.window(i) else rotary, expert_parallel)
            for i in range(first, end)})
        if self.is_last:
            self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, args.norm_plus_one)
            tied = self.embed_tokens if args.tie_word_embeddings and self.is_first else None
            self.lm_head = ParallelLMHead(args.vocab_size, args.hidden_size, dtype, comm, tied,
                                          args.final_softcap)

    def gather_row_parallel(self) -> int:
        """The row-parallel layers of attention and dense MLPs, and the MoE blocks, gather
        their inputs (see ``build_model``'s ``tp_invariant``); before the weights are loaded.
        How many did."""
        blocks = [m for m in self.modules() if isinstance(m, MoE)]
        inside = {id(m) for block in blocks for m in block.modules()}
        return (sum(m.gather_inputs() for m in self.modules()
                    if isinstance(m, RowParallelLinear) and id(m) not in inside)
                + sum(block.gather_inputs() for block in blocks))

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, batch: AttnBatch,
                keep: KeepRows | None = None) -> torch.Tensor:
        """inputs: token ids (tokens,) on the first stage, else hidden states (tokens, hidden)
        -> hidden states (tokens, hidden). On the last stage with ``keep`` (a KV cache
        present), the final layer still writes every token's keys and values but computes
        the rest only for the kept rows: -> (kept rows, hidden)."""
        x = self.embed(inputs) if self.is_first else inputs  # (tokens, hidden)
        layers = list(self.layers.values())
        for i, layer in enumerate(layers):
            final = keep is not None and self.is_last and i == len(layers) - 1
            x = layer(x, positions, batch, keep if final else None)
        return self.norm(x) if self.is_last else x

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (tokens,) -> (tokens, hidden)
        x = self.embed_tokens(ids)
        return x if self.embed_scale is None else x * self.embed_scale

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
        module = module.replace("block_sparse_moe.", "mlp.", 1)  # Mixtral's name for it
        if self.args.sparse(int(index)) and module.startswith("mlp."):
            return self._expert_target(index, module[4:])
        fused = _FUSED.get(module)
        if fused:
            return [(f"layers.{index}.{fused[0]}.{kind}", fused[1])]
        if module in _PACKED:  # Phi-3: one checkpoint tensor for several of our shards
            return [(f"layers.{index}.{module}.{kind}", shard, offset)
                    for shard, offset in self._packed_offsets(module)]
        return [(f"layers.{index}.{module}.{kind}", None)]

    def _expert_target(self, index: str, module: str) -> list[tuple]:
        """A Mixture-of-Experts block's tensor (``module``: its name inside the block): the
        router, an expert's projection (read only by the ranks holding that expert), the
        shared expert and its gate."""
        layer = f"layers.{index}.mlp"
        if module == "gate":
            return [(f"{layer}.gate", None)]
        if module == "shared_expert_gate":
            return [(f"{layer}.shared_gate", None)]
        m = re.fullmatch(r"experts\.(\d+)\.(\w+)", module)
        if m:
            expert, proj = int(m.group(1)), _EXPERT_PROJ.get(m.group(2))
            if proj is None or not self.layers[index].mlp.owns(expert):
                return []
            return [(f"{layer}.{'w2' if proj == 'down' else 'w13'}", (proj, expert))]
        if module.startswith("shared_expert."):  # named as a dense MLP's inside it
            proj = module.removeprefix("shared_expert.")
            target, shard = _FUSED.get(f"mlp.{proj}", (f"mlp.{proj}", None))
            return [(f"{layer}.shared.{target.removeprefix('mlp.')}.weight", shard)]
        return []

    @property
    def graph_safe(self) -> bool:
        """Whether a decode step reads no host value (CUDA graphs may capture it): not with
        experts (routing counts the tokens of each expert on the host)."""
        return not any(self.args.sparse_layers)

    def take_expert_load(self) -> list[list]:
        """[layer, tokens routed to each expert] of each Mixture-of-Experts layer of this
        stage since the last call (the counts restart)."""
        return [[int(i), layer.mlp.take_load()] for i, layer in self.layers.items()
                if isinstance(layer.mlp, MoE)]

    def _packed_offsets(self, module: str) -> list[tuple[str, int]]:
        """Each shard's first row in a packed checkpoint tensor (q, k, v or gate, up)."""
        a = self.args
        if module == "self_attn.qkv_proj":
            q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
            return [("q", 0), ("k", q), ("v", q + kv)]
        return [("gate", 0), ("up", a.intermediate_size)]


# checkpoints that pack q/k/v and gate/up into one tensor each (Phi-3), under our names
_PACKED = {"self_attn.qkv_proj", "mlp.gate_up_proj"}
# an expert's projections in the checkpoint (Qwen's names, Mixtral's w1/w3/w2) -> ours
_EXPERT_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down",
                "w1": "gate", "w3": "up", "w2": "down"}
# checkpoint module -> (our fused module, shard id)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
}

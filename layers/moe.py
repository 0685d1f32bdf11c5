"""Mixture-of-Experts feed-forward block (Mixtral, Qwen3-MoE, Qwen2-MoE), in two layouts.

A router (replicated on every rank) scores the experts for each token; the token goes to its
``top_k`` best, weighted by their softmax probabilities (renormalised over the chosen ones
where the family says so); an optional shared expert (Qwen2-MoE) sees every token, scaled by
a sigmoid gate. Each expert is a SwiGLU MLP.

Layouts (``expert_parallel``):

- experts tensor-parallel (default): every rank holds a slice of every expert's intermediate
  features (gate/up rows, down columns), as a dense MLP is split; it runs every routed
  token through its slices.
- expert-parallel: each rank holds whole experts, a contiguous range of them (uneven when the
  experts do not divide among the ranks: 5 experts on 2 ranks are 3 + 2), and runs only the
  tokens routed to its own experts.

Tensor parallelism leaves every rank with the whole batch's hidden states after attention,
and every rank's router makes the same choices, so the dispatch of a token to the rank that
owns its expert is a local selection (nothing travels), and the combine is one all-reduce of
the ranks' partial sums: the same one all-reduce a dense MLP ends with (an all-gather of the
tokens plus a reduce-scatter, fused). The shared expert is split like a dense MLP and joins
that one all-reduce.

With ``gather_inputs`` (deterministic mode, tp > 1) the block computes what tp = 1 does
instead, so that its outputs do not depend on the tensor-parallel degree: each routed
(token, expert) pair's weighted output is made whole on every rank and the pairs are
added into each token in expert order, as on one rank. Experts tensor-parallel: the
pairs' activations (each rank's intermediate slice) are gathered, each rank multiplies
them by its share of the hidden features of the down projection (all intermediate
columns) and those outputs are gathered. Expert-parallel: each pair is computed by the one
rank owning its expert, zeros elsewhere, and the all-reduce of the pairs is exact. The
shared expert's down projection gathers as a dense MLP's does.

Each forward counts the tokens routed to each expert (:attr:`MoE.load`): the worker reports
them with the step's result and the engine exports them as metrics.
"""

from __future__ import annotations

import torch
from torch import nn

from layers.linear import gather_columns, load_whole, make_param, output_shares
from layers.mlp import GatedMLP
from layers.ops import NATIVE
from layers.parallel import TensorParallelGroup
from layers.partition import split_range, split_sizes


class MoE(nn.Module):
    ops = NATIVE  # the worker's platform (layers.platform.use_ops)
    lowp_weights = ("w13", "w2")  # bf16 where the platform runs bf16 weights

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int,
                 normalize: bool, dtype: torch.dtype, comm: TensorParallelGroup,
                 expert_parallel: bool = False, shared_intermediate: int = 0):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"experts per token {top_k} must be in 1..{num_experts} (the experts)")
        tp, rank = comm.world_size, comm.rank
        self.comm, self.num_experts, self.top_k, self.normalize = comm, num_experts, top_k, normalize
        self.expert_parallel, self.intermediate = expert_parallel, intermediate
        self.gathers = False  # set by gather_inputs
        # gathering, experts tensor-parallel: hidden rows and intermediate features per rank
        self.out_sizes: list[int] = []
        self.inter_sizes: list[int] = []
        if expert_parallel:  # whole experts [first, first + count) on this rank
            self.first, count = split_range(num_experts, tp, rank)
            self.inter_start, self.inter = 0, intermediate
        else:  # a slice of every expert
            self.first, count = 0, num_experts
            self.inter_start, self.inter = split_range(intermediate, tp, rank)
        self.local = range(self.first, self.first + count)
        self.gate = make_param((num_experts, hidden), dtype, load_whole)  # the router
        # gate rows then up rows of each local expert; its down projection
        self.w13 = make_param((count, 2 * self.inter, hidden), dtype, self._load_w13)
        self.w2 = make_param((count, hidden, self.inter), dtype, self._load_w2)
        self.w13.shard_ids = [(part, e) for e in self.local for part in ("gate", "up")]
        self.w2.shard_ids = [("down", e) for e in self.local]
        self.shared = None
        if shared_intermediate:  # Qwen2-MoE: every token, scaled by sigmoid(shared_gate . x)
            self.shared = GatedMLP(hidden, shared_intermediate, dtype, comm)
            self.shared_gate = make_param((1, hidden), dtype, load_whole)
        self.load = torch.zeros(num_experts, dtype=torch.int64)  # tokens routed, since last taken

    def owns(self, expert: int) -> bool:
        return expert in self.local

    def _load_w13(self, param: nn.Parameter, source, shard_id) -> None:
        part, expert = shard_id
        rows = source.read(0, self.inter_start, self.inter)  # (inter, hidden)
        offset = 0 if part == "gate" else self.inter
        param.data[expert - self.first, offset:offset + self.inter].copy_(rows)

    def _load_w2(self, param: nn.Parameter, source, shard_id) -> None:
        _, expert = shard_id
        if self.out_sizes:  # gathering: this rank's hidden rows, every intermediate column
            start = sum(self.out_sizes[:self.comm.rank])
            rows = source.read(0, start, self.out_sizes[self.comm.rank])
        else:
            rows = source.read(1, self.inter_start, self.inter)
        param.data[expert - self.first].copy_(rows)

    def gather_inputs(self) -> bool:
        """Switch to computing each pair whole (see the module), before the weights are
        loaded; False (nothing changed) on a single rank."""
        ws = self.comm.world_size
        if ws == 1:
            return False
        if not self.expert_parallel:
            count, hidden, _ = self.w2.shape
            self.out_sizes = output_shares(hidden, ws)
            self.inter_sizes = split_sizes(self.intermediate, ws)  # every rank's slice
            self.w2 = make_param((count, self.out_sizes[self.comm.rank], self.intermediate),
                                 self.w2.dtype, self._load_w2)
            self.w2.shard_ids = [("down", e) for e in self.local]
        if self.shared is not None:
            self.shared.down_proj.gather_inputs()
        self.gathers = True
        return True

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's experts and their weights: (tokens, top_k) int64, (tokens, top_k)
        float32. x: (tokens, hidden)"""
        logits = self.ops.linear(x, self.gate)  # (tokens, experts)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (tokens, hidden) -> (tokens, hidden), summed over ranks
        if self.gathers:
            return self._gathered(x)
        out = self.partial(x)
        if self.shared is not None:
            self._add_shared(out, x, self.shared.partial(x))
        return self.comm.all_reduce(out)

    def _add_shared(self, out: torch.Tensor, x: torch.Tensor, shared: torch.Tensor) -> None:
        # out += the shared expert's output ``shared`` scaled by sigmoid(shared_gate . x)
        gate = self.ops.sigmoid(self.ops.linear(x, self.shared_gate).float())  # (tokens, 1)
        out += (shared.float() * gate).to(out.dtype)

    def _dispatch(self, x: torch.Tensor) -> list[tuple[int, int, int, torch.Tensor, torch.Tensor]]:
        """Route x's tokens (counting them in :attr:`load`); per expert that got any, in
        expert order: (expert, begin, end, rows, weights): its pairs' span in the pairs sorted
        by expert, their token rows (n,) and routing weights (n, 1) float32."""
        experts, weights = self.route(x)
        flat = experts.reshape(-1)  # (tokens * top_k,) token t's choices at t*k .. t*k+k-1
        order = torch.argsort(flat, stable=True)  # grouped by expert, tokens in order
        counts = torch.bincount(flat, minlength=self.num_experts)  # (experts,)
        self.load += counts.cpu()
        ends = counts.cumsum(0).tolist()
        pair_weights = weights.reshape(-1)
        spans = []
        for expert in range(self.num_experts):
            begin, end = (ends[expert - 1] if expert else 0), ends[expert]
            if begin < end:
                picks = order[begin:end]  # (n,) positions in ``flat``
                spans.append((expert, begin, end, picks // self.top_k,
                              pair_weights.index_select(0, picks).unsqueeze(1)))
        return spans

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's experts' weighted outputs for the tokens routed to them.
        x: (tokens, hidden) -> (tokens, hidden)"""
        out = torch.zeros_like(x)
        for expert, _, _, rows, w in self._dispatch(x):
            if self.owns(expert):
                y = self._expert(expert - self.first, x.index_select(0, rows))  # (n, hidden)
                out.index_add_(0, rows, (y.float() * w).to(out.dtype))
        return out

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        # x: (tokens, hidden) -> (tokens, hidden), the same on every rank
        spans = self._dispatch(x)
        pairs = sum(end - begin for _, begin, end, _, _ in spans)
        if self.expert_parallel:  # pairs in expert order, each computed on one rank alone
            whole = x.new_zeros(pairs, x.shape[1])
            for expert, begin, end, rows, w in spans:
                if self.owns(expert):
                    y = self._expert(expert - self.first, x.index_select(0, rows))
                    whole[begin:end] = (y.float() * w).to(x.dtype)
            whole = self.comm.all_reduce(whole)  # one non-zero term per element: exact
        else:
            acts = torch.cat([self.ops.silu_mul(self.ops.linear(
                x.index_select(0, rows), self.w13[expert - self.first]))
                for expert, _, _, rows, _ in spans])
            acts = gather_columns(self.comm, acts, self.inter_sizes)  # (pairs, intermediate)
            part = torch.cat([
                (self.ops.linear(acts[begin:end], self.w2[expert - self.first]).float() * w).to(x.dtype)
                for expert, begin, end, _, w in spans])
            whole = gather_columns(self.comm, part, self.out_sizes)
        out = torch.zeros_like(x)
        for _, begin, end, rows, _ in spans:  # into each token in expert order, as on one rank
            out.index_add_(0, rows, whole[begin:end])
        if self.shared is not None:
            self._add_shared(out, x, self.shared(x))
        return out

    def _expert(self, local: int, x: torch.Tensor) -> torch.Tensor:
        # x: (n, hidden) -> (n, hidden): this rank's part of expert ``local``'s SwiGLU
        gate_up = self.ops.linear(x, self.w13[local])  # (n, 2 * inter)
        return self.ops.linear(self.ops.silu_mul(gate_up), self.w2[local])

    def take_load(self) -> list[int]:
        """Tokens routed to each expert since the last call; resets the count."""
        load, self.load = self.load.tolist(), torch.zeros_like(self.load)
        return load

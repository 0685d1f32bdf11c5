"""Vocabulary-parallel embedding and LM head.

Each rank owns a contiguous slice of the (padded) vocabulary
(``layers.partition.padded_vocab_shard``). The embedding looks up the tokens in
its slice, zeroes the rest and all-reduces; the LM head computes logits for its
slice and rank ``dst`` of the group gathers the full row.
"""

from __future__ import annotations

import torch
from torch import nn

from layers.linear import make_param
from layers.ops import NATIVE, soft_cap
from layers.parallel import TensorParallelGroup
from layers.partition import padded_vocab_shard


class VocabParallelEmbedding(nn.Module):
    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, comm: TensorParallelGroup):
        super().__init__()
        self.vocab_size = vocab_size
        self.comm = comm
        self.start, self.per_rank, self.real_rows = padded_vocab_shard(
            vocab_size, comm.world_size, comm.rank)
        self.weight = make_param((self.per_rank, hidden), dtype, self._load)

    def _load(self, param: nn.Parameter, source, shard_id=None) -> None:
        if self.real_rows:
            param.data[:self.real_rows].copy_(source.read(0, self.start, self.real_rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: (tokens,) -> (tokens, hidden)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = self.ops.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.comm.all_reduce(out)


class ParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary slice, gathered on ``dst``.

    With tied embeddings the head shares the embedding's weight shard (same
    vocabulary split) and loads nothing itself.
    """

    packable = True  # the CPU path may repack the weight (layers.cpu.ops.CpuOps.prepare)
    ops = NATIVE  # the worker's platform (layers.platform.use_ops)

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, comm: TensorParallelGroup,
                 tied_to: VocabParallelEmbedding | None = None, softcap: float | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.comm = comm
        self.softcap = softcap  # logits capped to softcap * tanh(logit / softcap) (Gemma 2)
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            embedding_like = VocabParallelEmbedding(vocab_size, hidden, dtype, comm)
            self.weight = embedding_like.weight

    def forward(self, hidden: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        # hidden: (rows, hidden) -> full logits (rows, vocab_size) on dst, None elsewhere
        local = self.ops.linear(hidden, self.weight)  # (rows, per_rank)
        full = self.comm.gather(local, dst=dst, dim=-1)  # (rows, per_rank * tp) on dst
        return None if full is None else soft_cap(full[:, :self.vocab_size], self.softcap)

    def greedy(self, hidden: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """Each row's argmax token (rows,) on dst, None elsewhere: the first maximum, as the
        full logits' argmax has it. Each rank reduces its own vocabulary slice, so only a
        (max, token id) pair per row and rank travels instead of the logits.

        hidden: (rows, hidden)"""
        start, _, real = padded_vocab_shard(self.vocab_size, self.comm.world_size, self.comm.rank)
        # (rows, real), no padding rows; capped as the full logits are (ties included)
        local = soft_cap(self.ops.linear(hidden, self.weight)[:, :real], self.softcap)
        pair = torch.full((hidden.shape[0], 2), -torch.inf, dtype=torch.float64, device=hidden.device)
        if real:
            best, index = self.ops.row_max(local)  # first maximum within the slice (exact)
            pair[:, 0], pair[:, 1] = best.double(), index + start  # ids exact in float64
        pairs = self.comm.gather(pair, dst=dst, dim=-1)  # (rows, 2 * tp) on dst: max, id, max, ..
        if pairs is None:
            return None
        rank = pairs[:, 0::2].argmax(dim=-1, keepdim=True)  # ties: the lower rank, lower ids
        return pairs[:, 1::2].gather(1, rank)[:, 0].long()

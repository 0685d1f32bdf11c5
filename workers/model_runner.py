"""Runs one StepPlan through this rank's model: batch preparation, forward, sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.protocol import SampledToken, StepPlan, StepResult
from layers.attention import AttnBatch
from layers.sampler import sample


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor  # (tokens,)
    positions: torch.Tensor  # (tokens,)
    attn: AttnBatch
    sample_rows: torch.Tensor  # (samples,) index of each sampling chunk's last token
    sample_chunks: list  # the SeqChunks that sample, in row order


def prepare(plan: StepPlan, block_size: int, device: torch.device) -> PreparedBatch:
    ids, positions, slots, rows, chunks = [], [], [], [], []
    for chunk in plan.chunks:
        n, start, table = len(chunk.token_ids), chunk.start_pos, chunk.block_table
        ids += chunk.token_ids
        span = range(start, start + n)
        positions += span
        slots += [table[p // block_size] * block_size + p % block_size for p in span]
        if chunk.sample:
            rows.append(len(ids) - 1)
            chunks.append(chunk)
    width = max(len(c.block_table) for c in plan.chunks)
    tables = [c.block_table + [0] * (width - len(c.block_table)) for c in plan.chunks]

    def tensor(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    attn = AttnBatch([len(c.token_ids) for c in plan.chunks], [c.start_pos for c in plan.chunks],
                     tensor(tables), tensor(slots))
    return PreparedBatch(tensor(ids), tensor(positions), attn, tensor(rows), chunks)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, block_size: int, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult | None:
        """Every rank runs the plan; TP rank 0 returns the sampled tokens, others None."""
        batch = prepare(plan, self.block_size, self.device)
        hidden = self.model(batch.input_ids, batch.positions, batch.attn)  # (tokens, hidden)
        if not batch.sample_chunks:  # same plan on every rank, so all skip together
            return StepResult(plan.step_id, [])
        logits = self.model.compute_logits(hidden.index_select(0, batch.sample_rows))
        if logits is None:
            return None
        positions = [c.start_pos + len(c.token_ids) for c in batch.sample_chunks]
        picked = sample(logits, [c.sampler for c in batch.sample_chunks], positions)
        return StepResult(plan.step_id, [
            SampledToken(c.seq_id, tok, lp, top)
            for c, (tok, lp, top) in zip(batch.sample_chunks, picked)])

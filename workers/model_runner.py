"""Runs one StepPlan through this rank's model: batch preparation, forward, sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.protocol import SampledToken, StepPlan, StepResult
from layers.attention import AttnBatch, KeepRows
from layers.sampler import sample


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor  # (tokens,)
    positions: torch.Tensor  # (tokens,)
    attn: AttnBatch
    sample_rows: torch.Tensor  # (samples,) index of each sampling chunk's last token
    sample_chunks: list  # the SeqChunks that sample, in row order
    sample_seqs: list[int]  # (samples,) each sampling chunk's index in the plan


def prepare(plan: StepPlan, block_size: int, device: torch.device) -> PreparedBatch:
    ids, positions, slots, rows, chunks, seqs = [], [], [], [], [], []
    for i, chunk in enumerate(plan.chunks):
        n, start, table = len(chunk.token_ids), chunk.start_pos, chunk.block_table
        ids += chunk.token_ids
        span = range(start, start + n)
        positions += span
        slots += [table[p // block_size] * block_size + p % block_size for p in span]
        if chunk.sample:
            rows.append(len(ids) - 1)
            chunks.append(chunk)
            seqs.append(i)
    width = max(len(c.block_table) for c in plan.chunks)
    tables = [c.block_table + [0] * (width - len(c.block_table)) for c in plan.chunks]

    def tensor(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    attn = AttnBatch([len(c.token_ids) for c in plan.chunks], [c.start_pos for c in plan.chunks],
                     tensor(tables), tensor(slots))
    return PreparedBatch(tensor(ids), tensor(positions), attn, tensor(rows), chunks, seqs)


def run_stage(model, pp_comm, input_ids: torch.Tensor, positions: torch.Tensor,
              attn: AttnBatch, keep: KeepRows | None = None) -> torch.Tensor | None:
    """This pipeline stage's layers: receive hidden states from the previous stage (unless
    first), run, hand them to the next stage (unless last). Returns the last stage's
    final hidden states (tokens, hidden), or (kept rows, hidden) with ``keep``; None on the
    other stages."""
    if model.is_first:
        inputs = input_ids
    else:  # (tokens, hidden) from rank r of the previous stage
        inputs = torch.empty(input_ids.shape[0], model.args.hidden_size,
                             dtype=model.dtype, device=input_ids.device)
        pp_comm.recv(inputs, src=pp_comm.rank - 1)
    hidden = model(inputs, positions, attn, keep if model.is_last else None)
    if model.is_last:
        return hidden
    pp_comm.send(hidden.contiguous(), dst=pp_comm.rank + 1)
    return None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, block_size: int, device: torch.device,
                 pp_comm=None):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.pp_comm = pp_comm

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult | None:
        """Every rank runs the plan; TP rank 0 returns the sampled tokens, others None."""
        batch = prepare(plan, self.block_size, self.device)
        # the final layer goes on only for the sampled rows (prompt tokens before them just
        # leave their keys and values in the cache); a decode-only step samples every row
        keep = None
        if batch.sample_chunks and len(batch.sample_chunks) < batch.input_ids.shape[0]:
            keep = KeepRows(batch.sample_rows, batch.sample_seqs)
        hidden = run_stage(self.model, self.pp_comm, batch.input_ids, batch.positions, batch.attn,
                           keep)
        if hidden is None:  # an earlier pipeline stage: the last one samples
            return None
        if not batch.sample_chunks:  # same plan on every rank, so all skip together
            return StepResult(plan.step_id, [])
        if keep is None:  # every row is sampled, in order
            hidden = hidden.index_select(0, batch.sample_rows)
        logits = self.model.compute_logits(hidden)  # (samples, vocab) on TP rank 0
        if logits is None:
            return None
        positions = [c.start_pos + len(c.token_ids) for c in batch.sample_chunks]
        picked = sample(logits, [c.sampler for c in batch.sample_chunks], positions)
        return StepResult(plan.step_id, [
            SampledToken(c.seq_id, tok, lp, top)
            for c, (tok, lp, top) in zip(batch.sample_chunks, picked)])

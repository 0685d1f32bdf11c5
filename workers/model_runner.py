"""Runs one StepPlan through this rank's model: batch preparation, forward, sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.contract.messages import (FOLLOW, PromptScores, ProtocolError, SampledToken,
                                      SamplerParams, SeqParams, StepPlan, StepResult,
                                      kept_guesses)
from layers.attention import AttnBatch, KeepRows
from layers.ops import host_tensor
from layers.sampler import argmax_suffices, logprob_rows, sample

SCORE_ROWS = 256  # prompt positions scored per LM-head call: logits memory SCORE_ROWS x vocab


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor  # (tokens,)
    positions: torch.Tensor  # (tokens,)
    attn: AttnBatch
    # the rows sampled after: each sampling chunk's last token, and before it each of its
    # guesses' places (a chunk with a ``draft``), in the plan's order
    sample_rows: torch.Tensor  # (samples,) token rows
    sample_chunks: list  # (samples,) the SeqChunk of each
    sample_seqs: list[int]  # (samples,) its sequence's index in the AttnBatch
    sample_lens: list[int]  # (samples,) its context through the row: the sampled position
    score_spans: list  # (chunk, first row, rows) of each chunk that scores its prompt


def prepare(plan: StepPlan, block_size: int, device: torch.device) -> PreparedBatch:
    """The step's tensors. Each chunk is one sequence of the AttnBatch, except a chunk with
    guesses, whose every token is a one-token sequence of its own (its context up to that
    token, its block table): the verification of guesses is then shaped as a decode step,
    and runs the decode paths (the fused decode layer, CUDA graphs)."""
    ids, positions, slots, rows, chunks, seqs, lens, spans = [], [], [], [], [], [], [], []
    entries = []  # the AttnBatch's sequences: (new tokens, first position, block table)
    for chunk in plan.chunks:
        n, start, table = len(chunk.token_ids), chunk.start_pos, chunk.block_table
        if chunk.prompt_targets:
            spans.append((chunk, len(ids), len(chunk.prompt_targets)))
        ids += chunk.token_ids
        span = range(start, start + n)
        positions += span
        slots += [table[p // block_size] * block_size + p % block_size for p in span]
        if not 0 <= chunk.draft < n or (chunk.draft and not chunk.sample):
            raise ProtocolError(f"step {plan.step_id}: sequence {chunk.seq_id}'s chunk of {n} "
                                f"tokens cannot hold {chunk.draft} guesses")
        entries += [(1, p, table) for p in span] if chunk.draft else [(n, start, table)]
        if chunk.sample:
            for back in range(chunk.draft, -1, -1):
                rows.append(len(ids) - 1 - back)
                chunks.append(chunk)
                seqs.append(len(entries) - 1 - back)
                lens.append(start + n - back)
    width = max(len(table) for _, _, table in entries)
    tables = [table + [0] * (width - len(table)) for _, _, table in entries]

    def tensor(values):
        return host_tensor(values, device)

    attn = AttnBatch([n for n, _, _ in entries], [start for _, start, _ in entries],
                     tensor(tables), tensor(slots))
    return PreparedBatch(tensor(ids), tensor(positions), attn, tensor(rows), chunks, seqs, lens,
                         spans)


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


class SeqState:
    """What this rank holds of a sequence between its plan's ``samplers`` entry and its
    ``drop``: its sampling parameters and prompt length, and on the sampling rank, where its
    sampling reads them, its tokens (``tokens``; None elsewhere)."""

    __slots__ = ("sampler", "prompt_len", "tokens")

    def __init__(self, params: SeqParams, keeps_tokens: bool):
        self.sampler: SamplerParams = params.sampler
        self.prompt_len = params.prompt_len
        self.tokens: list[int] | None = [] if keeps_tokens and params.sampler.needs_history() \
            else None

    def take(self, chunk) -> None:
        """A chunk's tokens (FOLLOW resolved): they take positions ``start_pos ..``."""
        if self.tokens is None:
            return
        if chunk.history is not None:
            self.tokens = list(chunk.history)
        if len(self.tokens) < chunk.start_pos:
            raise ProtocolError(f"sequence {chunk.seq_id}: a chunk at position {chunk.start_pos} "
                                f"without its history, and this rank holds {len(self.tokens)} "
                                "of its tokens")
        del self.tokens[chunk.start_pos:]
        self.tokens += chunk.token_ids


class SampleRow:
    """What a sampled row's logits need beyond its parameters: its sequence's tokens before
    the sampled position ``at`` (``history``: [prompt length, tokens], None where sampling
    does not read them), its bans and what its grammar allows (``allowed``, set from the
    step's masks)."""

    def __init__(self, chunk, state: SeqState, at: int):
        tokens = state.tokens
        if tokens is not None and len(tokens) > at:  # a guess's place: the tokens before it
            tokens = tokens[:at]
        self.history = None if tokens is None else [state.prompt_len, tokens]
        self.banned = chunk.banned
        self.allowed: torch.Tensor | None = None  # (vocab,) bool

    @property
    def output(self) -> list[int]:
        """The sequence's output tokens before the sampled position."""
        return self.history[1][self.history[0]:]


def _kept(chunks: list, picked: list) -> list[SampledToken]:
    """The step's tokens from its sampled rows (``chunks[i]``'s row ``i`` gave ``picked[i]``):
    one per chunk, and for a chunk with guesses its kept guesses and the token after them
    (``kept_guesses``)."""
    out, i = [], 0
    while i < len(chunks):
        chunk = chunks[i]
        rows = picked[i:i + chunk.draft + 1]
        keep = 1
        if chunk.draft:
            keep += kept_guesses(chunk.token_ids[-chunk.draft:], [tok for tok, _, _ in rows])
        out += [SampledToken(chunk.seq_id, tok, lp, top) for tok, lp, top in rows[:keep]]
        i += chunk.draft + 1
    return out


class ModelRunner:
    def __init__(self, model: torch.nn.Module, block_size: int, device: torch.device,
                 pp_comm=None, tp_comm=None, graphs=None, grammars=None, ops=None):
        self.model = model
        self.ops = ops  # the platform (layers.platform), for the sampler's kernels
        self.grammars = grammars  # layers.grammar.Grammars on the sampling rank, else None
        self.graphs = graphs  # workers.cuda_graphs.DecodeGraphs, or None: every step eager
        self.block_size = block_size
        self.device = device
        self.pp_comm = pp_comm
        self.tp_comm = tp_comm
        # the previous step's samples, for [FOLLOW] chunks (async scheduling): the sequence
        # ids in row order (every rank) and their tokens (the sampling rank)
        self.sampled_seqs: list[int] = []
        self.sampled: dict[int, int] = {}
        self.seqs: dict[int, SeqState] = {}  # the sequences the plans have named, until dropped
        self.grammar_users: dict[str, int] = {}  # compiled grammar key -> sequences using it

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult | None:
        """Every rank runs the plan; TP rank 0 of the last stage returns the sampled tokens,
        TP rank 0 of an earlier stage of a Mixture-of-Experts model its experts' load, the
        others None."""
        result = self._execute(plan)
        if self.model.args.num_experts and (self.tp_comm is None or self.tp_comm.rank == 0):
            result = result or StepResult(plan.step_id, [])
            result.expert_load = self.model.take_expert_load()
        return result

    def _execute(self, plan: StepPlan) -> StepResult | None:
        self._take_sequences(plan)
        self._resolve_follow(plan)
        for chunk in plan.chunks:
            self._state(chunk.seq_id, plan.step_id).take(chunk)
        batch = prepare(plan, self.block_size, self.device)
        self.sampled_seqs, self.sampled = [c.seq_id for c in batch.sample_chunks], {}
        rows = [SampleRow(c, self.seqs[c.seq_id], at)
                for c, at in zip(batch.sample_chunks, batch.sample_lens)]
        masks = self._start_masks(batch.sample_chunks, rows)  # computed during the forward
        # the final layer goes on only for the sampled rows (prompt tokens before them just
        # leave their keys and values in the cache) unless the prompt is scored; a
        # decode-only step samples every row
        keep = None
        if batch.sample_chunks and len(batch.sample_chunks) < batch.input_ids.shape[0] \
                and not batch.score_spans:
            keep = KeepRows(batch.sample_rows, batch.sample_seqs)  # each its entry's last
        if keep is None and self.graphs is not None and self.graphs.handles(batch.attn):
            hidden = self.graphs.run(batch.input_ids, batch.positions, batch.attn)
        else:
            hidden = run_stage(self.model, self.pp_comm, batch.input_ids, batch.positions,
                               batch.attn, keep)
        if hidden is None:  # an earlier pipeline stage: the last one samples
            return None
        scores = self._score(hidden, batch.score_spans)  # None: not the sampling rank
        if not batch.sample_chunks:  # same plan on every rank, so all skip together
            return None if scores is None else StepResult(plan.step_id, [], scores)
        if keep is None:  # every row is sampled, in order
            hidden = hidden.index_select(0, batch.sample_rows)
        picked = self._sample(hidden, batch.sample_chunks, rows, masks, batch.sample_lens)
        if picked is None:  # not the sampling rank
            return None
        tokens = _kept(batch.sample_chunks, picked)
        self.sampled = {t.seq_id: t.token_id for t in tokens}  # each sequence's last
        return StepResult(plan.step_id, tokens, scores)

    def _score(self, hidden: torch.Tensor, spans: list) -> list[PromptScores] | None:
        """The prompt logprobs of each scoring chunk on TP rank 0, None on the other ranks
        (every rank takes part in the LM head); [] when no chunk scores.
        hidden: (tokens, hidden), every row of the step"""
        if not spans:
            return []
        rows = torch.cat([torch.arange(first, first + n) for _, first, n in spans])  # (scored,)
        targets = torch.tensor([t for chunk, _, _ in spans for t in chunk.prompt_targets])
        top_n = max(self.seqs[chunk.seq_id].sampler.prompt_logprobs or 0 for chunk, _, _ in spans)
        picked, top = [], []
        for at in range(0, rows.shape[0], SCORE_ROWS):
            part = rows[at:at + SCORE_ROWS].to(hidden.device)
            logits = self.model.compute_logits(hidden.index_select(0, part))  # (part, vocab)
            if logits is None:
                continue
            p, t = logprob_rows(logits, targets[at:at + SCORE_ROWS].to(logits.device), top_n)
            picked += p
            top += t
        if not picked:
            return None
        out, at = [], 0
        for chunk, _, n in spans:
            k = self.seqs[chunk.seq_id].sampler.prompt_logprobs or 0
            out.append(PromptScores(chunk.seq_id, chunk.start_pos + 1, picked[at:at + n],
                                    [row[:k] for row in top[at:at + n]]))
            at += n
        return out

    def _start_masks(self, chunks: list, rows: list[SampleRow]):
        """The grammar masks of the step's constrained rows, started on the mask thread
        (None: no row is constrained, or this rank does not sample)."""
        if self.grammars is None:
            return None
        constrained = [(c.seq_id, *self.seqs[c.seq_id].sampler.grammar, r.output)
                       for c, r in zip(chunks, rows) if self.seqs[c.seq_id].sampler.grammar]
        return self.grammars.start(constrained) if constrained else None

    def _sample(self, hidden: torch.Tensor, chunks: list, rows: list[SampleRow],
                masks, positions: list[int]) -> list | None:
        """(token, logprob, top logprobs) per sampled row on TP rank 0, None elsewhere.
        hidden: (samples, hidden); ``masks``: the constrained rows' grammar masks, in order;
        ``positions``: each row's sampled position"""
        params = [self.seqs[c.seq_id].sampler for c in chunks]
        if argmax_suffices(params, banned=any(c.banned for c in chunks)):
            # greedy on the raw logits, no logprobs: no logits need to travel (each TP rank's
            # vocabulary slice gives its argmax); penalties, a bias or bans take the path below
            tokens = self.model.greedy_tokens(hidden)  # (samples,) on TP rank 0
            return None if tokens is None else [(t, None, None) for t in tokens.tolist()]
        logits = self.model.compute_logits(hidden)  # (samples, vocab) on TP rank 0
        if logits is None:
            return None
        if masks is not None:
            allowed = iter(masks.result())
            for p, row in zip(params, rows):
                if p.grammar:
                    row.allowed = next(allowed)
        return sample(logits, params, positions, rows, self.ops)

    def _take_sequences(self, plan: StepPlan) -> None:
        """The plan's news of sequences, in order: compiled grammars, the parameters of
        sequences new here (or replaced), the sequences to forget."""
        if self.grammars is not None:  # the sampling rank
            for key, ends, blob in plan.grammars:
                self.grammars.add(key, ends, blob)
        keeps_tokens = self.grammars is not None  # the sampling rank
        for params in plan.samplers:
            old = self.seqs.get(params.seq_id)
            self.seqs[params.seq_id] = state = SeqState(params, keeps_tokens)
            if old is not None and old.tokens is not None and state.tokens is not None:
                state.tokens = old.tokens
            self._use_grammar(state.sampler, 1)
            if old is not None:
                self._use_grammar(old.sampler, -1)
        for seq_id in plan.drop:
            state = self.seqs.pop(seq_id, None)
            if state is not None:
                self._use_grammar(state.sampler, -1)
                if self.grammars is not None:
                    self.grammars.forget(seq_id)

    def _use_grammar(self, sampler: SamplerParams, change: int) -> None:
        """Count the sequences using a compiled grammar; the last one gone releases it."""
        if not sampler.grammar:
            return
        key = sampler.grammar[0]
        users = self.grammar_users[key] = self.grammar_users.get(key, 0) + change
        if users <= 0:
            del self.grammar_users[key]
            if self.grammars is not None:
                self.grammars.release(key)

    def _state(self, seq_id: int, step_id: int) -> SeqState:
        state = self.seqs.get(seq_id)
        if state is None:
            raise ProtocolError(f"step {step_id} names sequence {seq_id}, whose sampling "
                                "parameters no plan has sent to this worker")
        return state

    def _resolve_follow(self, plan: StepPlan) -> None:
        """Give each ``[FOLLOW]`` chunk the token the previous step sampled for its sequence."""
        follows = [c for c in plan.chunks if c.token_ids == [FOLLOW]]
        if not follows:
            return
        last = self.sampled
        if self.tp_comm is not None and self.tp_comm.world_size > 1:  # TP rank 0 sampled
            tokens = torch.tensor([last.get(s, 0) for s in self.sampled_seqs], dtype=torch.int64,
                                  device=self.device)  # (previous samples,)
            last = dict(zip(self.sampled_seqs, self.tp_comm.broadcast(tokens, src=0).tolist()))
        for chunk in follows:
            if chunk.seq_id not in last:
                raise ProtocolError(f"step {plan.step_id} follows sequence {chunk.seq_id}, which "
                                    "the previous step did not sample")
            chunk.token_ids = [last[chunk.seq_id]]

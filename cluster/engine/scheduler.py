"""Iteration-level scheduling with chunked prefill and preemption by recompute.

Each :meth:`Scheduler.schedule` call plans one step:

1. every running sequence, in (priority, arrival) order, gets its next chunk:
   one token (the last, whose KV is not yet written) when decoding, or the next
   piece of its prefill, within the token budget ``max_num_batched_tokens``. A
   prefill whose rest past the budget would be a tail of at most 1/16 of the budget
   is taken whole (so a step holds up to ``max_step_tokens``): left for the next
   step, those few tokens would delay the request's first token by a whole step,
   to shorten this one by next to nothing.
   When a chunk needs a block and none is free, the lowest-priority,
   latest-arrived running sequence not yet planned this step is preempted (its
   blocks freed, ``num_computed_tokens`` reset, back to the waiting queue with
   its generated tokens kept, so it later prefills prompt + outputs and goes on
   exactly where it stopped). That may be the sequence itself.
2. if nothing was preempted, waiting sequences are admitted in (priority,
   arrival) order while ``max_num_seqs`` and the token budget allow, each
   starting from its prefix-cache hit. Admission stops at the first sequence
   that does not fit (no overtaking).

A chunk covers ``all_token_ids[start:start + n]`` at ``start_pos = start =
num_computed_tokens`` and samples (``sample=True``) only when it reaches the
sequence's last token; the sampled token's position is ``num_tokens``.
After a successful step the engine calls :meth:`Scheduler.commit`, appends the
sampled tokens, and calls :meth:`Scheduler.finish` for sequences that stop.

Async scheduling: the engine may plan step N+1 while step N runs. A sequence whose step-N
chunk samples and that the engine expects to go on (``follow``) then gets a one-token chunk
``[FOLLOW]`` at position ``num_tokens``: the worker feeds it the token step N sampled. Its
slot is reserved without preempting anyone (every other running sequence may be in flight
too); when no block is free it simply waits for step N's answer. If step N's token ends the
sequence (EOS, a stop string), the follow-up's token is discarded.

Speculative decoding: given ``guess`` (the engine's proposer), a decoding sequence's chunk
also carries the guesses for the tokens after its last (``SeqChunk.draft``), within the token
budget and only where free blocks hold them (a guess never preempts anyone). The step keeps
the guesses the target agrees with and samples one token after them; :meth:`commit` counts
the kept guesses' KV as computed and releases the blocks that held only rejected ones.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.engine.block_manager import BlockManager
from cluster.contract.messages import FOLLOW, SeqChunk
from cluster.engine.sequence import Sequence, SequenceStatus


TAIL_FRACTION = 16  # a prefill tail of at most budget / 16 tokens joins its chunk


def max_step_tokens(max_num_batched_tokens: int) -> int:
    """The most tokens a step plans: the budget plus the longest tail it may take."""
    return max_num_batched_tokens + _longest_tail(max_num_batched_tokens)


def _longest_tail(max_num_batched_tokens: int) -> int:
    return max_num_batched_tokens // TAIL_FRACTION


class SchedulerError(RuntimeError):
    """A sequence can never be scheduled (it needs more KV blocks or tokens than
    exist); ``seq_id`` names it so the engine can fail that request (abort it)
    and call :meth:`Scheduler.schedule` again."""

    def __init__(self, message: str, seq_id: int):
        super().__init__(message)
        self.seq_id = seq_id


@dataclass
class SchedulerOutput:
    """One step's plan; ``chunks[i]`` belongs to ``seqs[i]``."""

    chunks: list[SeqChunk] = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


class Scheduler:
    """Decides which sequences run each step and with which token chunks."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_chunked_prefill: bool = True):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got "
                             f"{max_num_batched_tokens}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key
        self.num_preemptions = 0
        self._next_arrival = 0

    # ---- queue management ----------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (assigning its arrival index when unset)."""
        if seq.arrival is None:
            seq.arrival = self._next_arrival
        self._next_arrival = max(self._next_arrival, seq.arrival) + 1
        self._check_fits(seq)
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def get(self, seq_id: int) -> Sequence | None:
        for s in self.running + self.waiting:
            if s.seq_id == seq_id:
                return s
        return None

    def abort(self, seq_id: int) -> Sequence | None:
        """Remove a sequence wherever it is, freeing its blocks."""
        seq = self.get(seq_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` finished with ``reason`` and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _to_waiting(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def preempt_all(self, keep_prefix_cache: bool = False) -> list[Sequence]:
        """Send every running sequence back to waiting for replay (failure recovery).

        Their blocks are freed and ``num_computed_tokens`` reset; generated
        tokens are kept, so each re-admission prefills prompt + outputs. The
        prefix cache is cleared too (the restarted workers' KV is empty) unless
        ``keep_prefix_cache``. Not counted in ``num_preemptions``.
        """
        seqs = list(self.running)
        for seq in seqs:
            self._to_waiting(seq)
        if not keep_prefix_cache:
            self.block_manager.reset_prefix_cache()
        return seqs

    def _check_fits(self, seq: Sequence) -> None:
        need = self.block_manager.blocks_needed(seq.num_tokens)
        if need > self.block_manager.num_blocks:
            raise SchedulerError(
                f"sequence {seq.seq_id} has {seq.num_tokens} tokens, needing {need} KV blocks "
                f"of {self.block_manager.block_size} tokens, but the cache has only {self.block_manager.num_blocks}",
                seq.seq_id)
        if not self.enable_chunked_prefill and seq.num_tokens > self.max_num_batched_tokens:
            raise SchedulerError(
                f"sequence {seq.seq_id} has {seq.num_tokens} tokens to prefill, more than "
                f"max_num_batched_tokens={self.max_num_batched_tokens}, and chunked prefill "
                "is disabled", seq.seq_id)

    # ---- one step ----------------------------------------------------------
    def _emit(self, out: SchedulerOutput, seq: Sequence, n: int,
              draft: list[int] | None = None) -> None:
        start = seq.num_computed_tokens
        self._append(out, seq, seq.all_token_ids[start:start + n], start,
                     start + n == seq.num_tokens, draft)
        if start < seq.prefill_len:
            out.num_prefill_tokens += n
        else:
            out.num_decode_tokens += n + len(draft or ())

    def _follow(self, out: SchedulerOutput, seq: Sequence) -> bool:
        """Plan the decode step after ``seq``'s in-flight one (whose sampled token, at
        position ``num_tokens``, only the worker knows yet); False if no block is free."""
        if not self.block_manager.ensure_slots(seq, seq.num_tokens + 1):
            return False
        self._append(out, seq, [FOLLOW], seq.num_tokens, True)
        out.num_decode_tokens += 1
        return True

    @staticmethod
    def _append(out: SchedulerOutput, seq: Sequence, token_ids: list[int], start: int,
                sample: bool, draft: list[int] | None = None) -> None:
        out.chunks.append(SeqChunk(
            seq_id=seq.seq_id,
            token_ids=token_ids + (draft or []),
            start_pos=start,
            block_table=list(seq.block_table),
            sample=sample,
            prompt_targets=_prompt_targets(seq, start, len(token_ids)),
            banned=seq.end_ids if sample and _before_min_tokens(seq, start + len(token_ids))
            else None,
            draft=len(draft or ()),
        ))
        out.seqs.append(seq)

    def _guesses(self, seq: Sequence, n: int, budget: int,
                 guess: Callable[[Sequence, int], list[int]] | None) -> list[int]:
        """The guesses ``seq``'s chunk of ``n`` tokens carries: where it is the sequence's
        last token, what ``guess`` proposes within the budget left, as far as free blocks
        hold them."""
        if guess is None or n != 1 or seq.num_computed_tokens + 1 != seq.num_tokens or budget <= 1:
            return []
        draft = guess(seq, budget - 1)
        while draft and not self.block_manager.ensure_slots(seq, seq.num_tokens + len(draft)):
            draft = draft[:-1]
        return draft

    def _schedule_running(self, out: SchedulerOutput, budget: int, busy: frozenset,
                          limit: int, follow: frozenset, guess=None) -> int:
        i = 0
        while i < len(self.running) and budget > 0 and len(out.seqs) < limit:
            seq = self.running[i]
            if seq.seq_id in busy:  # its previous chunk is still in flight
                if seq.seq_id in follow and self._follow(out, seq):
                    budget -= 1
                i += 1
                continue
            n = self._chunk(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                raise RuntimeError(f"sequence {seq.seq_id} sampled a token that was neither "
                                   "appended nor finished")
            while not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + n):
                # lowest priority, latest arrival, not yet planned, not in flight
                victim = [s for s in self.running[i:] if s.seq_id not in busy][-1]
                if victim is seq and len(self.running) == 1:  # it alone cannot fit
                    need = self.block_manager.blocks_needed(seq.num_computed_tokens + n)
                    raise SchedulerError(
                        f"sequence {seq.seq_id} needs {need} KV blocks of {self.block_manager.block_size} "
                        f"tokens but the cache has only {self.block_manager.num_blocks}", seq.seq_id)
                self._to_waiting(victim)
                self.num_preemptions += 1
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                draft = self._guesses(seq, n, budget, guess)
                self._emit(out, seq, n, draft)
                budget -= n + len(draft)
                i += 1
        return budget

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens to plan of a prefill with ``remaining`` left: the budget, or all of them
        where the rest would be a tail of at most max_num_batched_tokens / TAIL_FRACTION."""
        tail = _longest_tail(self.max_num_batched_tokens)
        return remaining if remaining <= budget + tail else budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int, limit: int) -> None:
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and len(out.seqs) < limit):
            seq = self.waiting[0]
            self._check_fits(seq)  # outputs may have grown it since add()
            cached = self.block_manager.allocate_prefix(seq)
            n = seq.num_tokens - cached
            if n > budget and not self.enable_chunked_prefill:
                self.block_manager.cancel_admission(seq)
                break
            n = self._chunk(n, budget)
            if not self.block_manager.ensure_slots(seq, cached + n):
                self.block_manager.cancel_admission(seq)
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            seq.prefill_len = seq.num_tokens
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            self._emit(out, seq, n)
            budget -= n

    def schedule(self, busy: frozenset = frozenset(), limit: int | None = None,
                 follow: frozenset = frozenset(), guess=None) -> SchedulerOutput:
        """Plan the next step (see the module docstring). Sequences whose ids are in
        ``busy`` have a step in flight and are left alone, except those also in ``follow``
        (async scheduling: their in-flight chunk samples and they go on), which get a
        ``[FOLLOW]`` decode chunk; ``limit`` caps the sequences in this plan (a micro-batch);
        ``guess(seq, most)``: up to ``most`` guesses of the tokens after a decoding
        sequence's last (speculative decoding), None: no guesses."""
        out = SchedulerOutput()
        limit = limit or self.max_num_seqs
        budget = self._schedule_running(out, self.max_num_batched_tokens, busy, limit, follow,
                                        guess)
        if not out.preempted:
            self._admit_waiting(out, budget, limit)
        return out

    def commit(self, out: SchedulerOutput, kept: dict[int, int] | None = None) -> None:
        """Record that ``out``'s step ran: its chunks' KV is now written, up to the guesses
        the step kept (``kept``: sequence id -> kept guesses, for chunks with a draft); the
        blocks that held only rejected guesses are released."""
        for seq, chunk in zip(out.seqs, out.chunks):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted or preempted since the plan was made
            rejected = chunk.draft - (kept or {}).get(seq.seq_id, 0) if chunk.draft else 0
            seq.num_computed_tokens += len(chunk.token_ids) - rejected
            if rejected:  # the next step needs the kept tokens and the token after them
                self.block_manager.release_tail(seq, seq.num_computed_tokens + 1)
            self.block_manager.register_full_blocks(seq)


def _prompt_targets(seq: Sequence, start: int, n: int) -> list[int] | None:
    """The prompt tokens that follow positions ``start .. start + n`` when ``seq`` scores its
    prompt (``prompt_logprobs``); None otherwise or past the prompt."""
    if seq.sampling_params.prompt_logprobs is None or start + 1 >= seq.num_prompt_tokens:
        return None
    return seq.prompt_token_ids[start + 1:min(start + n + 1, seq.num_prompt_tokens)]


def _before_min_tokens(seq: Sequence, sampled_at: int) -> bool:
    """Whether the token sampled at position ``sampled_at`` comes before ``min_tokens``."""
    return bool(seq.end_ids) and (
        sampled_at - seq.num_prompt_tokens < seq.sampling_params.min_tokens)

"""Speculative decoding's driver side: the proposers that guess a sequence's next tokens,
and the engine's :class:`Speculator` (docs/ARCHITECTURE.md, "Speculative decoding").

A proposer guesses the next few tokens of a sequence cheaply; the target model scores the
sequence's last token and the guesses in one step, and every guess up to the first one the
target would not have produced itself is kept, followed by the target's own token at that
place (``cluster.contract.messages.kept_guesses``, applied on the sampling rank). The
target's own token at each place is what the sampler gives for that position (the argmax,
or the seeded Gumbel-max sample of :mod:`layers.sampler`, whose noise is a function of the
request's seed and the position alone), so the kept tokens are exactly those a run without
speculation produces from the same logits: only the cost changes. (For one guess per place,
as the n-gram proposer's, a guess is kept with the target's probability of it, as rejection
sampling against a one-hot draft keeps it.)

- :class:`NgramIndex`: prompt lookup. The sequence's last n tokens (n from
  ``prompt_lookup_max`` down to ``prompt_lookup_min``) are looked up among its earlier tokens
  (prompt and output) and the tokens that followed their most recent earlier occurrence are
  proposed (vLLM's proposer takes the earliest; the most recent follows what the output is
  repeating now). The index is kept up to date as tokens arrive (a dictionary per n from each
  n-gram to where it last ended), so a proposal costs O(max n) whatever the context's length.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from weakref import WeakKeyDictionary

from cluster.contract.config import SpeculativeConfig
from cluster.engine.sequence import Sequence
from cluster.engine.suffix import SuffixCache


class NgramIndex:
    """Prompt lookup over one sequence's tokens; :meth:`extend` with every new token."""

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int = 1,
                 prompt_lookup_max: int = 4, tokens: Iterable[int] = ()):
        for name, value in (("num_speculative_tokens", num_speculative_tokens),
                            ("prompt_lookup_min", prompt_lookup_min),
                            ("prompt_lookup_max", prompt_lookup_max)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config.{name}: {value!r} must be a whole number >= 1")
        if prompt_lookup_min > prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({prompt_lookup_min}) must "
                             f"not exceed prompt_lookup_max ({prompt_lookup_max})")
        self.k, self.min_n, self.max_n = num_speculative_tokens, prompt_lookup_min, prompt_lookup_max
        self.tokens: list[int] = []
        # n -> {n-gram: the index just past its most recent occurrence that is not the suffix}
        self._ends: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(self.min_n, self.max_n + 1)}
        self.extend(tokens)

    def extend(self, new: Iterable[int]) -> None:
        for token in new:
            # the n-grams ending at the current last token stop being the suffix now: index them
            end = len(self.tokens)
            for n, ends in self._ends.items():
                if end >= n:
                    ends[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(int(token))

    def propose(self, limit: int | None = None) -> list[int]:
        """Up to ``num_speculative_tokens`` (and ``limit``) guesses; [] where no n-gram of the
        suffix occurred before."""
        return self.lookup(limit)[1]

    def lookup(self, limit: int | None = None) -> tuple[int, list[int]]:
        """(the length of the suffix matched, :meth:`propose`'s guesses); (0, []) for none."""
        k = self.k if limit is None else min(self.k, limit)
        size = len(self.tokens)
        if k <= 0:
            return 0, []
        for n in range(self.max_n, self.min_n - 1, -1):
            if size <= n:
                continue
            end = self._ends[n].get(tuple(self.tokens[size - n:]))
            if end is not None:
                return n, self.tokens[end:end + k]
        return 0, []


class ModeRates:
    """Whether steps with guesses make tokens faster than steps without, for each size of
    batch, as measured on this engine: tokens per second of the engine's time from one step's
    result to the next's, kept per batch-size class (running sequences 1, 2-3, 4-7, ...) and
    per mode (fading averages). A class picks the faster mode, after trying each mode
    ``TRIES`` times, and tries the other one every ``EXPLORE``-th step, so a change of load,
    text or machine is seen."""

    TRIES, EXPLORE, FADE = 3, 16, 0.8

    def __init__(self):
        self._rates: dict[tuple[int, bool], list[float]] = {}  # (class, mode) -> [n, tokens, s]
        self._decisions: dict[int, int] = {}

    @staticmethod
    def size_class(running: int) -> int:
        return max(running, 1).bit_length()

    def choose(self, running: int) -> bool:
        """Whether a step planned now with ``running`` sequences should guess."""
        size = self.size_class(running)
        seen = {mode: self._rates.get((size, mode), [0, 0.0, 0.0]) for mode in (True, False)}
        for mode in (True, False):
            if seen[mode][0] < self.TRIES:
                return mode
        count = self._decisions[size] = self._decisions.get(size, 0) + 1
        faster = max((True, False), key=lambda m: seen[m][1] / max(seen[m][2], 1e-9))
        return (not faster) if count % self.EXPLORE == 0 else faster

    def observe(self, running: int, guessed: bool, tokens: int, seconds: float) -> None:
        """A decode step planned with ``running`` sequences, with guesses or not, gave
        ``tokens`` in ``seconds`` since the step before it came back."""
        key = (self.size_class(running), guessed)
        n, made, spent = self._rates.get(key, [0, 0.0, 0.0])
        self._rates[key] = [n + 1, made * self.FADE + tokens, spent * self.FADE + seconds]


class _Tracked:
    """What the speculator keeps of one sequence: its n-gram index, and how often its
    guesses were kept (counts fading by ``FADE`` per step, so that a sequence that stopped
    guessing for lack of acceptance tries again later)."""

    __slots__ = ("index", "kept", "missed", "step")
    FADE = 0.9

    def __init__(self, index: NgramIndex, step: int):
        self.index, self.kept, self.missed, self.step = index, 0.0, 0.0, step

    def keep_rate(self, step: int) -> float:
        """The chance that a guess is kept, given the guesses before it were: kept guesses
        over kept and first-rejected ones, from a prior of one each."""
        fade = self.FADE ** (step - self.step)
        self.kept, self.missed, self.step = self.kept * fade, self.missed * fade, step
        return (self.kept + 1.0) / (self.kept + self.missed + 2.0)


class Speculator:
    """The engine's speculation: each sequence's proposer (made on its first proposal, kept
    up to date from its tokens, gone with the sequence), how many guesses it makes, whether a
    step guesses at all, and the counts of what was guessed and kept (vLLM's spec-decode
    metrics).

    A sequence makes its i-th guess while the chance that it is kept, ``p ** i`` (``p`` its
    own recent record: :class:`_Tracked`), is at least ``MIN_CHANCE``. Whether a step guesses
    at all is measured (:class:`ModeRates`): a guess costs the step a row, which is nearly
    free at small batches and not at large ones (by how much depends on the machine, the
    model and the kernels), and under async scheduling a step with guesses cannot have the
    next step planned while it runs, which hides the driver's time between steps. So each
    batch size takes whichever of guessing and not guessing has made tokens faster."""

    MIN_CHANCE = 0.3

    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config, self.max_model_len = config, max_model_len
        self._collected_at = None  # when the last step's result came back
        self._planned: dict[int, int] = {}  # id of a step in flight -> sequences running then
        self._guess_next: bool | None = None  # whether the next step planned guesses
        self._seqs: WeakKeyDictionary[Sequence, _Tracked] = WeakKeyDictionary()
        self.modes = ModeRates()
        self.suffix = None if config.method != "suffix" else SuffixCache(
            config.suffix_decoding_max_tree_depth, config.suffix_decoding_max_cached_requests,
            config.suffix_decoding_max_cached_tokens, config.suffix_decoding_min_token_prob)
        self._step = 0
        self.num_drafts = 0  # chunks that carried guesses
        self.num_draft_tokens = 0  # guesses
        self.num_accepted_tokens = 0  # guesses kept
        self.accepted_per_pos = [0] * config.num_speculative_tokens  # kept, by place in the draft

    def plan_step(self) -> None:
        """A step is being planned (the sequences' records fade by steps)."""
        self._step += 1

    # ---- the engine's side: when to guess, what a step kept ---------------------------------
    def decide(self, running: list[Sequence]) -> bool:
        """Whether the next step planned guesses (decided once per step: where some of the
        ``running`` sequences may and would guess, and guessing steps have made tokens faster
        at this batch size, ``modes``); the engine's async scheduling waits for the steps in
        flight when it does."""
        if self._guess_next is None:
            self.plan_step()
            guessers = [s for s in running if self.room(s) > 0] \
                if self._source(running) is not None else []
            self._guess_next = bool(guessers) and self.modes.choose(len(running)) \
                and self.would_guess(guessers)
        return self._guess_next

    def plan(self, running: list[Sequence]):
        """The scheduler's source of guesses for the step planned now (``guess(seq, most)``),
        None for a step without guesses."""
        guess = self._source(running) if self.decide(running) else None
        self._guess_next = None
        return guess

    def _source(self, running: list[Sequence]):
        """None where no sequence may guess (``disable_by_batch_size`` or more running)."""
        cap = self.config.disable_by_batch_size
        return self._guesses if cap is None or len(running) < cap else None

    def _guesses(self, seq: Sequence, most: int) -> list[int]:
        room = self.room(seq)
        return self.propose(seq, min(most, room)) if room > 0 else []

    def room(self, seq: Sequence) -> int:
        """How many guesses ``seq`` may make: none before its ``min_tokens`` (its bans are
        per place), and none past its length (the token sampled after the guesses must fit
        too)."""
        params = seq.sampling_params
        if seq.num_output_tokens < params.min_tokens:
            return 0
        return min(params.max_tokens - seq.num_output_tokens,
                   self.max_model_len - seq.num_tokens) - 1

    def launched(self, out, running: int) -> None:
        """Step ``out`` (a SchedulerOutput) was launched with ``running`` sequences running."""
        self._planned[id(out)] = running

    def collected(self, out, result, idle: bool) -> dict[int, int]:
        """Step ``out`` came back with ``result``: how fast it made tokens, with or without
        guesses (decode steps only, timed from the step before it came back), and how many
        guesses each chunk with a draft kept (the step returned them and one token after);
        ``idle``: no other step is in flight (a recovery drops steps without collecting)."""
        now, running = time.monotonic(), self._planned.pop(id(out), 0)
        if self._collected_at is not None and running and not out.num_prefill_tokens:
            self.modes.observe(running, any(c.draft for c in out.chunks), len(result.tokens),
                               now - self._collected_at)
        self._collected_at = now
        if idle:
            self._planned.clear()
        returned = Counter(token.seq_id for token in result.tokens)
        kept = {}
        for seq, chunk in zip(out.seqs, out.chunks):
            if chunk.draft:
                kept[chunk.seq_id] = max(returned[chunk.seq_id] - 1, 0)
                self.record(seq, chunk.draft, kept[chunk.seq_id])
        return kept

    def would_guess(self, seqs: list[Sequence]) -> bool:
        """Whether some of ``seqs`` (those that may guess) has guesses now."""
        return any(self.propose(seq, 1) for seq in seqs)

    def propose(self, seq: Sequence, most: int) -> list[int]:
        """Up to ``most`` guesses of the tokens after ``seq``'s last, as many as are likely
        enough to be kept."""
        tracked = self._seqs.get(seq)
        if tracked is None:
            cfg = self.config
            tracked = self._seqs[seq] = _Tracked(NgramIndex(
                cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max),
                self._step)
        rate, chance, worth = tracked.keep_rate(self._step), 1.0, 0
        while worth < min(most, self.config.num_speculative_tokens):
            chance *= rate
            if chance < self.MIN_CHANCE:
                break
            worth += 1
        if worth <= 0:
            return []
        index = tracked.index
        if len(index.tokens) < seq.num_tokens:
            index.extend(seq.all_token_ids[len(index.tokens):])
        matched, guesses = index.lookup(worth)
        if self.suffix is not None:  # the deployment's outputs, where they match longer
            depth = self.config.suffix_decoding_max_tree_depth
            cached, others = self.suffix.propose(seq.all_token_ids[-depth:], worth)
            if cached > matched:
                return others
        return guesses

    def finished(self, seq: Sequence) -> None:
        """``seq`` ended (not aborted): suffix decoding caches its output, after the end of
        its prompt (the words its output followed)."""
        if self.suffix is not None and seq.num_output_tokens:
            keep = seq.num_output_tokens + self.config.suffix_decoding_max_tree_depth - 1
            self.suffix.add(seq.all_token_ids[-keep:])

    def record(self, seq: Sequence, guesses: int, kept: int) -> None:
        """``seq``'s chunk of ``guesses`` was verified and ``kept`` of them kept."""
        self.num_drafts += 1
        self.num_draft_tokens += guesses
        self.num_accepted_tokens += kept
        for place in range(kept):
            self.accepted_per_pos[place] += 1
        tracked = self._seqs.get(seq)
        if tracked is not None:
            tracked.keep_rate(self._step)  # fade to now
            tracked.kept += kept
            tracked.missed += kept < guesses

    def stats(self) -> dict:
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens,
                "spec_accepted_per_pos": list(self.accepted_per_pos)}

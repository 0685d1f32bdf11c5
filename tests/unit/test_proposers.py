"""The n-gram proposer and the acceptance rule of speculative decoding
(cluster/engine/proposers.py), against a brute-force reading of their definitions."""

from __future__ import annotations

import random

import pytest

from cluster.contract.messages import kept_guesses
from cluster.engine.proposers import NgramIndex


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """For n from max_n down: the last n tokens' most recent earlier occurrence (starting
    before the suffix does), and the k tokens after it."""
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_vllms_example_and_the_longest_ngram_first():
    index = NgramIndex(4, prompt_lookup_min=2, prompt_lookup_max=3, tokens=[1, 2, 3, 4, 2, 3])
    assert index.propose() == [4, 2, 3]  # [4, 2, 3] never occurred before; [2, 3] did
    index = NgramIndex(2, prompt_lookup_min=1, prompt_lookup_max=3,
                       tokens=[7, 8, 9, 5, 8, 9, 6, 7, 8, 9])
    assert index.propose() == [5, 8]  # [7, 8, 9] (after it: 5, 8) beats [8, 9]'s later match
    assert NgramIndex(3, tokens=[1, 2, 3]).propose() == []  # nothing repeats
    assert NgramIndex(3, tokens=[]).propose() == []
    assert NgramIndex(3, tokens=[5, 5, 5]).propose(limit=1) == [5]


@pytest.mark.parametrize("seed", range(20))
def test_the_index_kept_as_tokens_arrive_agrees_with_a_scan(seed):
    rng = random.Random(seed)
    k, min_n, max_n = rng.randint(1, 5), rng.randint(1, 3), rng.randint(3, 5)
    index = NgramIndex(k, prompt_lookup_min=min_n, prompt_lookup_max=max_n)
    tokens: list[int] = []
    for _ in range(300):  # a small vocabulary: plenty of repeats
        new = [rng.randrange(6) for _ in range(rng.choice((1, 1, 1, 3)))]
        tokens += new
        index.extend(new)
        assert index.propose() == brute_force(tokens, k, min_n, max_n)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="speculative_config.num_speculative_tokens: 0"):
        NgramIndex(0)
    with pytest.raises(ValueError, match="prompt_lookup_min \\(4\\) must not exceed prompt_lookup_max \\(2\\)"):
        NgramIndex(3, prompt_lookup_min=4, prompt_lookup_max=2)
    with pytest.raises(ValueError, match="prompt_lookup_max: 2.5"):
        NgramIndex(3, prompt_lookup_max=2.5)


def test_kept_guesses_are_the_guesses_up_to_the_first_the_target_would_not_make():
    assert kept_guesses([4, 5, 6], [4, 5, 6, 7]) == 3  # all kept, then the target's bonus token
    assert kept_guesses([4, 5, 6], [4, 9, 6, 7]) == 1  # the target's 9 replaces the 5
    assert kept_guesses([4, 5, 6], [3, 5, 6, 7]) == 0
    assert kept_guesses([], [3]) == 0
    with pytest.raises(ValueError, match="3 guesses need 4 target tokens, got 3"):
        kept_guesses([4, 5, 6], [4, 5, 6])


# ---- how much to guess, and when ------------------------------------------------------------
from cluster.contract.config import SpeculativeConfig  # noqa: E402
from cluster.contract.sampling import SamplingParams  # noqa: E402
from cluster.engine.proposers import ModeRates, Speculator  # noqa: E402
from cluster.engine.sequence import Sequence  # noqa: E402


def test_mode_rates_try_both_then_take_the_faster_and_look_again_now_and_then():
    rates = ModeRates()
    picks = []
    for _ in range(2 * ModeRates.TRIES):  # each mode tried first, at this size class
        mode = rates.choose(5)
        picks.append(mode)
        rates.observe(5, mode, tokens=12 if mode else 4, seconds=0.02)  # guessing: 3x faster
    assert picks.count(True) == picks.count(False) == ModeRates.TRIES
    later = [rates.choose(6) for _ in range(2 * ModeRates.EXPLORE)]  # 4-7 running: one class
    assert later.count(False) == 2 and later.count(True) == 2 * ModeRates.EXPLORE - 2
    # another class knows nothing yet: it tries guessing first
    assert rates.choose(20) is True
    # when not guessing becomes the faster (a fading average), the class turns
    for _ in range(10):
        rates.observe(5, False, tokens=4, seconds=0.001)
    assert [rates.choose(5) for _ in range(3)] == [False, False, False]


def _seq(tokens: list[int]) -> Sequence:
    return Sequence(0, tokens, SamplingParams(max_tokens=100))


def test_a_sequence_guesses_less_after_its_guesses_were_rejected_and_tries_again_later():
    spec = Speculator(SpeculativeConfig("ngram", 4, prompt_lookup_min=1, prompt_lookup_max=2), 1000)
    seq = _seq([1, 2, 3, 4, 5, 6, 7, 8, 1, 2])  # [1, 2] occurred: 3, 4, 5, 6 follow it
    spec.plan_step()
    # no record yet: kept with chance 1/2 each (a prior of one kept, one missed): one guess
    # (1/2), not two (1/4 < MIN_CHANCE)
    assert spec.propose(seq, 10) == [3]
    for _ in range(6):  # a step each, every guess kept: four guesses
        spec.plan_step()
        spec.record(seq, 4, 4)
    assert spec.propose(seq, 10) == [3, 4, 5, 6]
    assert spec.propose(seq, 2) == [3, 4]  # never more than asked
    for _ in range(30):  # none kept since: no guess
        spec.plan_step()
        spec.record(seq, 1, 0)
    assert spec.propose(seq, 10) == []
    for _ in range(40):  # steps pass without guesses: the record fades to the prior
        spec.plan_step()
    assert spec.propose(seq, 10) == [3]
    assert spec.stats()["spec_num_draft_tokens"] == 54 and spec.stats()["spec_num_accepted_tokens"] == 24
    assert spec.stats()["spec_accepted_per_pos"] == [6, 6, 6, 6]


# ---- suffix decoding's cache ----------------------------------------------------------------
from cluster.engine.suffix import SuffixCache  # noqa: E402


def brute_suffix(outputs: list[list[int]], context: list[int], limit: int, depth: int,
                 min_prob: float) -> tuple[int, list[int]]:
    """The definition, by scanning the cached outputs: the longest suffix of the context (up
    to depth - 1 tokens) after which guesses follow; a run's count is the places that start
    it (paths of up to depth tokens from every place), and the guesses are the most frequent
    next token (the lowest id among equals) while the chance of the run stays >= min_prob."""
    for length in range(min(depth - 1, len(context)), 0, -1):
        run, guesses, chance = context[len(context) - length:], [], 1.0
        while len(guesses) < limit and len(run) < depth:
            starts = [(o, i) for o in outputs for i in range(len(o)) if o[i:i + len(run)] == run]
            follow: dict[int, int] = {}
            for o, i in starts:
                if i + len(run) < len(o):
                    follow[o[i + len(run)]] = follow.get(o[i + len(run)], 0) + 1
            if not follow:
                break
            token = max(follow, key=lambda t: (follow[t], -t))
            chance *= follow[token] / len(starts)
            if chance < min_prob:
                break
            guesses.append(token)
            run = run + [token]
        if guesses:
            return length, guesses
    return 0, []


@pytest.mark.parametrize("seed", range(12))
def test_the_suffix_cache_agrees_with_a_scan_and_keeps_its_bounds(seed):
    rng = random.Random(seed)
    depth, requests, tokens = rng.choice([3, 5, 8]), rng.choice([2, 4, 50]), rng.choice([30, 500])
    cache = SuffixCache(depth, requests, tokens, min_token_prob=rng.choice([0.0, 0.2, 0.5]))
    kept: list[list[int]] = []
    for _ in range(rng.randint(1, 12)):
        output = [rng.randrange(6) for _ in range(rng.randint(1, 40))]
        cache.add(output)
        kept.append(output[-tokens:])
        while len(kept) > requests or sum(map(len, kept)) > tokens:  # the oldest go first
            kept.pop(0)
        assert len(cache) == len(kept) and cache.num_tokens == sum(map(len, kept))
        for _ in range(5):
            context = [rng.randrange(6) for _ in range(rng.randint(1, 10))]
            limit = rng.randint(1, 6)
            assert cache.propose(context, limit) == brute_suffix(
                kept, context, limit, depth, cache.min_token_prob), context
    # down to one output: every evicted path's counts were taken back
    cache.max_requests, last = 1, [rng.randrange(6) for _ in range(20)]
    cache.add(last)
    assert len(cache) == 1 and cache.num_tokens == 20
    for n in range(1, 6):
        context = [rng.randrange(6) for _ in range(n)]
        assert cache.propose(context, 4) == brute_suffix([last], context, 4, depth,
                                                         cache.min_token_prob)

"""The n-gram proposer and the acceptance rule of speculative decoding
(cluster/engine/proposers.py), against a brute-force reading of their definitions."""

from __future__ import annotations

import random

import pytest

from cluster.engine.proposers import NgramIndex, accepted


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


def test_accepted_keeps_the_guesses_up_to_the_first_the_target_would_not_make():
    assert accepted([4, 5, 6], [4, 5, 6, 7]) == 3  # all kept, then the target's bonus token
    assert accepted([4, 5, 6], [4, 9, 6, 7]) == 1  # the target's 9 replaces the 5
    assert accepted([4, 5, 6], [3, 5, 6, 7]) == 0
    assert accepted([], [3]) == 0
    with pytest.raises(ValueError, match="3 guesses need 4 target tokens, got 3"):
        accepted([4, 5, 6], [4, 5, 6])

"""Draft proposers for speculative decoding, and the rule that checks their drafts. The
engine does not speculate yet (issue 38 builds the verification step on these parts).

A proposer guesses the next few tokens of a sequence cheaply; the target model is to score
the sequence's last token and the guesses in one step, and every guess up to the first one
the target would not have produced itself is kept, followed by the target's own token at
that place. The target's own token at each place is what the sampler gives for that
position (the argmax, or the seeded Gumbel-max sample of :mod:`layers.sampler`, whose noise
is a function of the request's seed and the position alone), so :func:`accepted` keeps
exactly the tokens a run without speculation produces: the output is the target's, only
its cost changes. (For a draft of one guess per place, as the n-gram proposer's, this
accepts a guess with the target's probability of it, as rejection sampling against a
one-hot draft does.)

- :class:`NgramIndex`: prompt lookup. The sequence's last n tokens (n from
  ``prompt_lookup_max`` down to ``prompt_lookup_min``) are looked up among its earlier tokens
  (prompt and output) and the tokens that followed their most recent earlier occurrence are
  proposed (vLLM's proposer takes the earliest; the most recent follows what the output is
  repeating now). The index is kept up to date as tokens arrive (a dictionary per n from each
  n-gram to where it last ended), so a proposal costs O(max n) whatever the context's length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


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
        k = self.k if limit is None else min(self.k, limit)
        size = len(self.tokens)
        if k <= 0:
            return []
        for n in range(self.max_n, self.min_n - 1, -1):
            if size <= n:
                continue
            end = self._ends[n].get(tuple(self.tokens[size - n:]))
            if end is not None:
                return self.tokens[end:end + k]
        return []


def accepted(draft: Sequence[int], target: Sequence[int]) -> int:
    """How many of ``draft``'s guesses to keep: the length of its longest prefix that agrees
    with ``target``, the target's own token at each of those places (``target`` has one token
    more than the draft: after the kept guesses, the target's token at the first place that
    disagreed, or past the last guess, joins them)."""
    if len(target) != len(draft) + 1:
        raise ValueError(f"accepted: {len(draft)} guesses need {len(draft) + 1} target tokens, "
                         f"got {len(target)}")
    kept = 0
    while kept < len(draft) and draft[kept] == target[kept]:
        kept += 1
    return kept

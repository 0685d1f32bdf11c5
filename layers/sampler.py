"""The sampling kernel: logits -> one token per row, vectorised over the batch.

Sampling is a pure function of (logits row, sampler params, seed, position):
no ``torch.Generator`` state is involved, so a request draws the same token
whatever else is in the batch, in whatever order, and after a replay.

Random rows go through temperature scaling, then top-k, top-p (nucleus) and
min-p filters, then Gumbel-max sampling. The Gumbel noise for vocabulary entry
``v`` comes from a counter-based hash (splitmix64's finaliser, in torch int64
arithmetic) of ``(seed, position, v)``. Greedy rows (temperature below
``_GREEDY_EPS``, as in vLLM) take the argmax; ties go to the lowest token id.

Logprobs are ``log_softmax`` of the raw logits, before temperature and
filtering, which is what vLLM returns by default.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

_GREEDY_EPS = 1e-5  # temperatures below this sample greedily (vLLM's threshold)


class SamplerParams(Protocol):
    """One row's sampling parameters, as the step plan carries them (the workers'
    ``cluster.contract.messages.SamplerParams``)."""

    temperature: float  # below _GREEDY_EPS: greedy
    top_p: float
    top_k: int  # -1: no limit
    min_p: float
    seed: int  # unsigned 64-bit
    logprobs: int | None  # top-n logprobs to return, None for none
    prompt_logprobs: int | None  # top-n logprobs of the prompt's positions, None for none


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)
_UNIFORM_BITS = 23  # (k + 0.5) / 2**23 is exact in float32 and lies in (0, 1)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic)."""
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def hash_noise_bits(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """64 pseudo-random bits per (row, vocab entry), as int64 of shape (rows, vocab).

    ``seeds`` and ``positions`` are int64 of shape (rows,). Each entry depends
    only on its own (seed, position, v).
    """
    row = mix64(mix64(seeds + _GOLDEN) + positions * _GOLDEN)  # (rows,)
    v = torch.arange(1, vocab + 1, dtype=torch.int64, device=seeds.device) * _GOLDEN  # (vocab,)
    return mix64(row[:, None] + v[None, :])  # (rows, vocab)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise, float32 of shape (rows, vocab)."""
    k = _shr(hash_noise_bits(seeds, positions, vocab), 64 - _UNIFORM_BITS)
    u = (k.to(torch.float32) + 0.5) * (2.0 ** -_UNIFORM_BITS)  # (rows, vocab) in (0, 1)
    return -torch.log(-torch.log(u))


def filter_mask(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor) -> torch.Tensor:
    """Which tokens survive top-k, top-p and min-p, as bool (rows, vocab).

    ``x`` holds temperature-scaled logits (rows, vocab); the parameters are
    per-row tensors (rows,), with ``top_k <= 0`` meaning off. Filters apply in
    the order top-k, top-p (over the top-k survivors, renormalised), min-p
    (relative to the best token, so renormalisation does not matter). Ranks
    come from a stable descending sort, so ties keep the lower token id first
    and top-k keeps exactly k tokens. The best token always survives.
    """
    rows, vocab = x.shape
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)  # (rows, vocab)
    rank = torch.arange(vocab, device=x.device)[None, :]  # (1, vocab)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    keep = rank < k[:, None]  # (rows, vocab)
    probs = torch.softmax(sorted_x.masked_fill(~keep, -math.inf), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # exclusive cumulative mass
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    ratio = torch.exp(sorted_x - sorted_x[:, :1])  # prob / best prob
    keep &= ratio >= min_p[:, None]
    keep[:, 0] = True
    return torch.zeros_like(keep).scatter_(1, order, keep)


def _sample_random(logits: torch.Tensor, params: list[SamplerParams],
                   positions: list[int]) -> torch.Tensor:
    """Token ids (rows,) for non-greedy rows of ``logits`` (rows, vocab)."""
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)
    seeds = torch.tensor([_signed(p.seed) for p in params], dtype=torch.int64, device=dev)
    pos = torch.tensor(positions, dtype=torch.int64, device=dev)
    x = logits / temp[:, None]  # (rows, vocab)
    keep = filter_mask(x, top_k, top_p, min_p)
    scores = x.masked_fill(~keep, -math.inf) + gumbel_noise(seeds, pos, logits.shape[1])
    return torch.argmax(scores, dim=-1)


SampleOut = tuple[int, "float | None", "list[tuple[int, float]] | None"]


def argmax_suffices(params: list[SamplerParams]) -> bool:
    """True when every row samples greedily and wants no logprobs: the token ids are then the
    logits' argmax and nothing else of them is needed."""
    return all(p.temperature < _GREEDY_EPS and p.logprobs is None for p in params)


def sample(logits: torch.Tensor, params: list[SamplerParams],
           positions: list[int]) -> list[SampleOut]:
    """Sample one token per row.

    ``logits``: (rows, vocab), any float dtype (computed in float32).
    ``params[i]`` and ``positions[i]`` (the position the sampled token will
    occupy) belong to row ``i``. Returns, per row, ``(token id, logprob,
    top_logprobs)``: the logprob fields are None unless ``params[i].logprobs``
    is set; ``top_logprobs`` lists ``(token id, logprob)`` best first.
    """
    rows, vocab = logits.shape
    if len(params) != rows or len(positions) != rows:
        raise ValueError(f"sample: {rows} logit rows but {len(params)} params and "
                         f"{len(positions)} positions")
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1)  # greedy; first maximum = lowest id
    rand = [i for i, p in enumerate(params) if p.temperature >= _GREEDY_EPS]
    if rand:
        idx = torch.tensor(rand, device=logits.device)
        tokens[idx] = _sample_random(logits.index_select(0, idx), [params[i] for i in rand],
                                     [positions[i] for i in rand])
    token_list = tokens.tolist()
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    chosen_lp: dict[int, float] = {}
    top_lp: dict[int, list[tuple[int, float]]] = {}
    if want:
        idx = torch.tensor(want, device=logits.device)
        chosen, top = logprob_rows(logits.index_select(0, idx), tokens.index_select(0, idx),
                                   max(params[i].logprobs for i in want))
        for j, i in enumerate(want):
            chosen_lp[i] = chosen[j]
            top_lp[i] = top[j][:params[i].logprobs]
    return [(token_list[i], chosen_lp.get(i), top_lp.get(i)) for i in range(rows)]


def logprob_rows(logits: torch.Tensor, chosen: torch.Tensor, top_n: int
                 ) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Per row of ``logits`` (rows, vocab): the logprob of token ``chosen[row]`` (rows,) and
    the ``top_n`` most likely (token id, logprob), best first (``log_softmax`` of the raw
    logits, in float32)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (rows, vocab)
    picked = lp.gather(1, chosen[:, None].long())[:, 0].tolist()
    n = min(top_n, lp.shape[1])
    top_v, top_i = torch.topk(lp, n, dim=-1) if n else (lp[:, :0], lp[:, :0].long())
    return picked, [list(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]

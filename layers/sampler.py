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
    repetition_penalty: float  # 1: off
    frequency_penalty: float  # 0: off
    presence_penalty: float  # 0: off
    logit_bias: list | None  # [[token id, bias], ...]
    allowed_token_ids: list[int] | None  # only these may be sampled
    bad_words: list[list[int]] | None  # token sequences whose last token is banned
    grammar: list | None  # structured output (layers.grammar); its mask comes with Adjust


class Adjust(Protocol):
    """What one row's logits need before sampling, beyond its parameters (the step plan's
    ``cluster.contract.messages.SeqChunk``): its tokens so far, for the penalties, and the
    tokens it may not sample now (``min_tokens``)."""

    history: list | None  # [prompt length, tokens before the sampled position]
    banned: list[int] | None
    allowed: torch.Tensor | None  # (vocab,) bool: what its grammar allows now, None: no grammar


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
                   positions: list[int], ops=None) -> torch.Tensor:
    """Token ids (rows,) for non-greedy rows of ``logits`` (rows, vocab). Only rows with a
    top-k, top-p or min-p filter pay for it (a sort of their vocabulary); ``ops``: a platform
    whose ``gumbel_argmax`` makes the noise in place (else torch's ops here)."""
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    seeds = torch.tensor([_signed(p.seed) for p in params], dtype=torch.int64, device=dev)
    pos = torch.tensor(positions, dtype=torch.int64, device=dev)
    filtered = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0]
    if filtered:
        idx = torch.tensor(filtered, device=dev)
        sub = [params[i] for i in filtered]
        keep = filter_mask(
            logits.index_select(0, idx) / temp.index_select(0, idx)[:, None],
            torch.tensor([p.top_k for p in sub], dtype=torch.int64, device=dev),
            torch.tensor([p.top_p for p in sub], dtype=torch.float32, device=dev),
            torch.tensor([p.min_p for p in sub], dtype=torch.float32, device=dev))
        logits = logits.clone()
        logits.index_copy_(0, idx, logits.index_select(0, idx).masked_fill(~keep, -math.inf))
    picked = ops.gumbel_argmax(logits, seeds, pos, temp) if ops is not None else None
    if picked is not None:
        return picked.to(dev)
    return torch.argmax(logits / temp[:, None] + gumbel_noise(seeds, pos, logits.shape[1]), dim=-1)


SampleOut = tuple[int, "float | None", "list[tuple[int, float]] | None"]


def _penalizes(p: SamplerParams) -> bool:
    """Whether a row has a penalty on (they need its tokens so far)."""
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def adjusts(p: SamplerParams) -> bool:
    """Whether a row's logits change before sampling (penalties, a bias, a token mask)."""
    return (_penalizes(p) or bool(p.logit_bias) or bool(p.allowed_token_ids)
            or bool(p.bad_words) or bool(p.grammar))


def argmax_suffices(params: list[SamplerParams], banned: bool = False) -> bool:
    """True when every row samples greedily from its raw logits and wants no logprobs: the
    token ids are then the logits' argmax and nothing else of them is needed. ``banned``:
    some row has tokens it may not sample now."""
    return not banned and all(p.temperature < _GREEDY_EPS and p.logprobs is None
                              and not adjusts(p) for p in params)


def adjust_logits(logits: torch.Tensor, params: list[SamplerParams], rows: list[Adjust]
                  ) -> torch.Tensor:
    """The logits each row samples from (vLLM's semantics, in this order): tokens its grammar
    does not allow now and tokens outside ``allowed_token_ids`` at -inf; the logit bias added; tokens banned now (``min_tokens``,
    and a bad word's last token where the output ends with the rest of it) at -inf; the
    repetition penalty on every token
    of the prompt or the output (a positive logit divided by it, a negative one multiplied);
    the frequency penalty times each token's count in the output and the presence penalty
    once per token present in the output subtracted. Batched: one op of each kind for the
    rows that need it. A new tensor; ``logits`` (rows, vocab) float32 is left as it is (the
    logprobs are of the raw logits)."""
    out = logits.clone()
    dev, vocab = logits.device, logits.shape[1]
    constrained = [i for i, r in enumerate(rows) if getattr(r, "allowed", None) is not None]
    if constrained:
        allowed = torch.stack([rows[i].allowed for i in constrained]).to(dev)  # (rows', vocab)
        if len(constrained) == len(rows):  # every row: in place
            out.masked_fill_(allowed.logical_not_(), -math.inf)
        else:
            idx = torch.tensor(constrained, device=dev)
            out.index_copy_(0, idx, out.index_select(0, idx).masked_fill(~allowed, -math.inf))
    masked = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if masked:
        keep = torch.zeros(len(masked), vocab, dtype=torch.bool, device=dev)
        for r, i in enumerate(masked):
            ids = [t for t in params[i].allowed_token_ids if 0 <= t < vocab]
            keep[r, torch.tensor(ids, dtype=torch.int64, device=dev)] = True
        rows_ = torch.tensor(masked, device=dev)
        out.index_copy_(0, rows_, out.index_select(0, rows_).masked_fill(~keep, -math.inf))
    biased = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or [])
              if 0 <= t < vocab]
    if biased:
        i, t, b = zip(*biased)
        out.index_put_((torch.tensor(i, device=dev), torch.tensor(t, device=dev)),
                       torch.tensor(b, dtype=out.dtype, device=dev), accumulate=True)
    ban = [(i, t) for i, r in enumerate(rows) for t in (r.banned or []) + _bad_word_bans(
        params[i], r) if 0 <= t < vocab]
    if ban:
        i, t = zip(*ban)
        out[torch.tensor(i, device=dev), torch.tensor(t, device=dev)] = -math.inf
    pen = [i for i, p in enumerate(params) if rows[i].history is not None and _penalizes(p)]
    if pen:
        _penalize(out, [params[i] for i in pen], [rows[i].history for i in pen], pen)
    return out


def _bad_word_bans(p: SamplerParams, row: Adjust) -> list[int]:
    """The last token of each bad word whose other tokens end the output so far."""
    if not p.bad_words:
        return []
    output = row.history[1][row.history[0]:] if row.history is not None else []
    return [w[-1] for w in p.bad_words
            if len(w) == 1 or (len(output) >= len(w) - 1 and output[len(output) - len(w) + 1:] == w[:-1])]


def _penalize(out: torch.Tensor, params: list, histories: list, index: list[int]) -> None:
    """The three penalties on rows ``index`` of ``out`` (rows, vocab), in place."""
    dev, vocab = out.device, out.shape[1]
    width = max(max(len(h[1]) for h in histories), 1)
    tokens = torch.full((len(index), width), vocab, dtype=torch.int64)  # vocab: padding
    is_output = torch.zeros(len(index), width, dtype=torch.bool)
    for r, (prompt_len, ids) in enumerate(histories):
        tokens[r, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        is_output[r, prompt_len:len(ids)] = True
    tokens, is_output = tokens.to(dev), is_output.to(dev)
    seen = torch.zeros(len(index), vocab + 1, device=dev)  # (rows, vocab + padding)
    seen.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=seen.dtype))
    counts = torch.zeros(len(index), vocab + 1, device=dev)
    counts.scatter_add_(1, tokens, is_output.to(counts.dtype))
    seen, counts = seen[:, :vocab] > 0, counts[:, :vocab]  # (rows, vocab)
    rows = torch.tensor(index, device=dev)
    x = out.index_select(0, rows)
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
    x = x - freq * counts - pres * (counts > 0).to(x.dtype)
    out.index_copy_(0, rows, x)


def sample(logits: torch.Tensor, params: list[SamplerParams],
           positions: list[int], adjust: list[Adjust] | None = None, ops=None
           ) -> list[SampleOut]:
    """Sample one token per row.

    ``logits``: (rows, vocab), any float dtype (computed in float32).
    ``params[i]`` and ``positions[i]`` (the position the sampled token will
    occupy) belong to row ``i``; ``adjust[i]`` (its history and bans) where a
    row's logits change before sampling (:func:`adjust_logits`); ``ops`` the platform (its
    ``gumbel_argmax``), if any. Returns, per row,
    ``(token id, logprob, top_logprobs)``: the logprob fields are None unless
    ``params[i].logprobs`` is set (of the raw logits); ``top_logprobs`` lists
    ``(token id, logprob)`` best first.
    """
    rows, vocab = logits.shape
    if len(params) != rows or len(positions) != rows:
        raise ValueError(f"sample: {rows} logit rows but {len(params)} params and "
                         f"{len(positions)} positions")
    logits = logits.float()
    chosen_from = logits  # the raw logits, or the adjusted ones (penalties, bias, bans)
    if adjust is not None and (any(adjusts(p) for p in params) or any(a.banned for a in adjust)):
        chosen_from = adjust_logits(logits, params, adjust)
    rand = [i for i, p in enumerate(params) if p.temperature >= _GREEDY_EPS]
    if len(rand) == rows:  # every row random: no argmax, no copy of their logits
        tokens = _sample_random(chosen_from, params, positions, ops)
    else:
        tokens = torch.argmax(chosen_from, dim=-1)  # greedy: the first maximum, the lowest id
        if rand:
            idx = torch.tensor(rand, device=logits.device)
            tokens[idx] = _sample_random(chosen_from.index_select(0, idx),
                                         [params[i] for i in rand], [positions[i] for i in rand], ops)
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

"""The sampling kernel: purity, greedy, filters, distribution, logprobs."""

import math
import random

import pytest
import torch

from cluster.contract.messages import SamplerParams
from layers.sampler import adjust_logits, filter_mask, mix64, sample

U64 = (1 << 64) - 1


def py_mix64(z: int) -> int:
    """splitmix64's finaliser in Python integers (reference for the int64 version)."""
    z &= U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def to_signed(z: int) -> int:
    return z - (1 << 64) if z >= 1 << 63 else z


def test_mix64_matches_python_reference_with_wrapping():
    rng = random.Random(0)
    vals = [0, 1, -1, (1 << 63) - 1, -(1 << 63)] + [rng.getrandbits(64) for _ in range(200)]
    vals = [to_signed(v & U64) for v in vals]
    got = mix64(torch.tensor(vals, dtype=torch.int64)).tolist()
    assert got == [to_signed(py_mix64(v)) for v in vals]


def test_splitmix64_published_sequence():
    # splitmix64 seeded with 1234567: state += golden gamma, then mix.
    gamma = 0x9E3779B97F4A7C15
    states = [to_signed((1234567 + gamma * k) & U64) for k in range(1, 4)]
    got = [v & U64 for v in mix64(torch.tensor(states, dtype=torch.int64)).tolist()]
    assert got == [6457827717110365317, 3203168211198807973, 9817491932198370423]


def _random_params(rng: random.Random) -> SamplerParams:
    return SamplerParams(temperature=rng.choice([0.0, 0.5, 1.0, 1.3]),
                         top_p=rng.choice([1.0, 0.9, 0.5]), top_k=rng.choice([-1, 1, 5, 20]),
                         min_p=rng.choice([0.0, 0.05, 0.3]), seed=rng.getrandbits(64),
                         logprobs=rng.choice([None, 0, 3]))


def test_row_result_independent_of_batch_composition_and_order():
    torch.manual_seed(0)
    rng = random.Random(1)
    vocab = 300
    logits = torch.randn(12, vocab) * 3
    params = [_random_params(rng) for _ in range(12)]
    positions = [rng.randrange(0, 4000) for _ in range(12)]
    alone = [sample(logits[i:i + 1], [params[i]], [positions[i]])[0] for i in range(12)]
    batched = sample(logits, params, positions)
    assert batched == alone
    for trial in range(3):
        perm = list(range(12))
        rng.shuffle(perm)
        extra = torch.randn(5, vocab)
        rows = torch.cat([logits[perm], extra])
        ps = [params[i] for i in perm] + [_random_params(rng) for _ in range(5)]
        pos = [positions[i] for i in perm] + [0] * 5
        out = sample(rows, ps, pos)
        assert [out[j] for j in range(12)] == [alone[i] for i in perm]


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -0.5, -3.0]])
    out = sample(logits, [SamplerParams(temperature=0.0, seed=i) for i in range(3)], [0, 1, 2])
    assert [t for t, _, _ in out] == [1, 0, 2]
    x = torch.randn(20, 1000)
    out = sample(x, [SamplerParams(temperature=0.0, seed=i) for i in range(20)], list(range(20)))
    assert [t for t, _, _ in out] == x.argmax(dim=-1).tolist()


def test_top_k_one_equals_greedy():
    x = torch.randn(64, 500) * 2
    x[0, 7] = x[0, 9] = x[0].max() + 1.0  # a tie: lowest id wins, like argmax
    params = [SamplerParams(temperature=1.5, top_k=1, seed=s) for s in range(64)]
    out = sample(x, params, [s * 3 for s in range(64)])
    assert [t for t, _, _ in out] == x.argmax(dim=-1).tolist()
    assert out[0][0] == 7


def _chi2(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


LOGITS6 = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
CHI2_DF5_P001 = 20.5  # chi-square critical value, 5 degrees of freedom, p = 0.001


@pytest.mark.parametrize("vary", ["seed", "position"])
def test_empirical_distribution_matches_softmax_over_temperature(vary):
    n, temp = 4000, 0.7
    logits = LOGITS6.expand(n, 6).contiguous()
    if vary == "seed":
        params = [SamplerParams(temperature=temp, seed=s) for s in range(n)]
        positions = [17] * n
    else:
        params = [SamplerParams(temperature=temp, seed=12345)] * n
        positions = list(range(n))
    toks = [t for t, _, _ in sample(logits, params, positions)]
    counts = [toks.count(v) for v in range(6)]
    right = torch.softmax(LOGITS6 / temp, dim=-1).tolist()
    wrong_t = torch.softmax(LOGITS6 / 1.0, dim=-1).tolist()
    assert _chi2(counts, right) < CHI2_DF5_P001
    assert _chi2(counts, wrong_t) > 5 * CHI2_DF5_P001


def ref_keep(row: list[float], temp: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Independent reference: which token ids survive the filters, in float64."""
    x = [v / temp for v in row]
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    kept = order[:top_k] if top_k > 0 else order
    m = max(x[i] for i in kept)
    w = [math.exp(x[i] - m) for i in kept]
    total = sum(w)
    if top_p < 1.0:
        acc, cut = 0.0, []
        for i, wi in zip(kept, w):
            cut.append(i)
            acc += wi / total
            if acc >= top_p:
                break
        kept = cut
    best = max(x)
    return {i for i in kept if math.exp(x[i] - best) >= min_p}


def test_filters_match_reference_and_never_emit_filtered_tokens():
    rng = random.Random(3)
    torch.manual_seed(3)
    vocab, rows = 40, 300
    x = torch.randn(rows, vocab) * 2
    params = [SamplerParams(temperature=rng.choice([0.3, 1.0, 2.0]),
                            top_k=rng.choice([-1, 1, 3, 10, 60]),
                            top_p=rng.choice([1.0, 0.95, 0.6, 0.2, 1e-6]),
                            min_p=rng.choice([0.0, 0.1, 0.5, 1.0]), seed=rng.getrandbits(64))
              for _ in range(rows)]
    refs = [ref_keep(x[i].double().tolist(), p.temperature, p.top_k, p.top_p, p.min_p)
            for i, p in enumerate(params)]
    temp = torch.tensor([p.temperature for p in params])[:, None]
    mask = filter_mask(x / temp, torch.tensor([p.top_k for p in params]),
                       torch.tensor([p.top_p for p in params]),
                       torch.tensor([p.min_p for p in params]))
    for i in range(rows):
        assert set(mask[i].nonzero()[:, 0].tolist()) == refs[i], (i, params[i])
    for rep in range(20):
        ps = [SamplerParams(p.temperature, p.top_p, p.top_k, p.min_p, p.seed + rep) for p in params]
        toks = sample(x, ps, [rep] * rows)
        for i, (t, _, _) in enumerate(toks):
            assert t in refs[i], (i, params[i], t, refs[i])


def test_filtered_distribution_is_renormalised_softmax():
    n = 4000
    logits = LOGITS6.expand(n, 6).contiguous()
    params = [SamplerParams(temperature=1.0, top_k=4, top_p=0.8, seed=s) for s in range(n)]
    toks = [t for t, _, _ in sample(logits, params, [0] * n)]
    keep = ref_keep(LOGITS6.tolist(), 1.0, 4, 0.8, 0.0)
    assert keep == {0, 1, 2}
    p = torch.softmax(LOGITS6[:3], dim=-1).tolist()
    counts = [toks.count(v) for v in range(3)]
    assert sum(counts) == n
    assert _chi2(counts, p) < 13.8  # 2 degrees of freedom, p = 0.001


def test_logprobs_are_raw_log_softmax_and_top_n_sorted():
    torch.manual_seed(5)
    x = torch.randn(4, 50) * 2
    params = [SamplerParams(temperature=0.8, seed=1, logprobs=5),
              SamplerParams(temperature=0.0, logprobs=0),
              SamplerParams(temperature=1.0, seed=2, logprobs=None),
              SamplerParams(temperature=0.0, logprobs=100)]
    out = sample(x, params, [3, 4, 5, 6])
    ref = torch.log_softmax(x, dim=-1)
    for i in (0, 1, 3):
        tok, lp, top = out[i]
        assert lp == pytest.approx(ref[i, tok].item(), abs=1e-6)
        want = min(params[i].logprobs, 50)
        assert len(top) == want
        vals = [v for _, v in top]
        assert vals == sorted(vals, reverse=True)
        for t, v in top:
            assert v == pytest.approx(ref[i, t].item(), abs=1e-6)
        if want:
            assert top[0][0] == ref[i].argmax().item()
    assert out[1][2] == [] and out[2][1] is None and out[2][2] is None


def test_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 4), [SamplerParams()], [0, 1])


class _Row:
    def __init__(self, prompt: list[int], output: list[int], banned=None):
        self.history, self.banned = [len(prompt), prompt + output], banned


def test_penalties_bias_and_bans_match_transformers_processors():
    """Each adjustment against its reference: transformers' repetition penalty (over prompt
    and output), its sequence bias for single tokens, its min-new-tokens processor; the
    frequency and presence penalties against the formula OpenAI documents for them."""
    from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor,
                                                        SequenceBiasLogitsProcessor)

    g = torch.Generator().manual_seed(0)
    vocab = 64
    logits = torch.randn(4, vocab, generator=g) * 3
    prompt, output = [[1, 2, 3, 2], [7, 8], [4], [9, 10, 11]], [[5, 5, 9], [8, 8, 8, 1], [], [10, 12, 12, 12]]
    params = [SamplerParams(temperature=0.0, repetition_penalty=1.3),
              SamplerParams(temperature=0.0, logit_bias=[[3, 5.0], [4, -2.5]]),
              SamplerParams(temperature=0.7, seed=3),
              SamplerParams(temperature=0.0, frequency_penalty=0.4, presence_penalty=-0.7)]
    rows = [_Row(p, o) for p, o in zip(prompt, output)]
    rows[2].banned = [0, 63]
    got = adjust_logits(logits, params, rows)
    assert torch.equal(logits, logits.clone())  # the raw logits stay for the logprobs

    def ids(i):
        return torch.tensor([prompt[i] + output[i]])

    want = [RepetitionPenaltyLogitsProcessor(1.3)(ids(0), logits[0:1].clone())[0],
            SequenceBiasLogitsProcessor({(3,): 5.0, (4,): -2.5})(ids(1), logits[1:2].clone())[0],
            MinNewTokensLengthLogitsProcessor(1, 2, [0, 63])(ids(2), logits[2:3].clone())[0]]
    counts = torch.bincount(torch.tensor(output[3]), minlength=vocab).float()
    want.append(logits[3] - counts * 0.4 - (counts > 0).float() * -0.7)
    for i in range(4):
        torch.testing.assert_close(got[i], want[i], atol=1e-6, rtol=1e-6)
    assert not torch.equal(got[0], logits[0]) and not torch.equal(got[3], logits[3])

    sampled = sample(logits, params, [10, 10, 10, 10], rows)
    assert [t for t, _, _ in sampled][:2] == [int(got[0].argmax()), int(got[1].argmax())]
    assert sampled[2][0] not in (0, 63)
    logprobs = sample(logits[:1], [SamplerParams(temperature=0.0, logprobs=1, repetition_penalty=2.0)],
                      [5], [_Row(prompt[0], output[0])])[0]
    assert logprobs[1] == pytest.approx(torch.log_softmax(logits[0], -1)[logprobs[0]].item())


def test_allowed_tokens_and_bad_words_match_transformers_processors():
    """``allowed_token_ids`` against transformers' prefix-constrained processor, bad words
    (one token, and two whose first ends the output) against its bad-words processor."""
    from transformers.generation.logits_process import (NoBadWordsLogitsProcessor,
                                                        PrefixConstrainedLogitsProcessor)

    g = torch.Generator().manual_seed(1)
    vocab = 40
    logits = torch.randn(2, vocab, generator=g)
    prompt, output = [3, 4], [9, 17]
    params = [SamplerParams(temperature=0.0, allowed_token_ids=[2, 5, 31]),
              SamplerParams(temperature=0.0, bad_words=[[6], [17, 8], [9, 11]])]
    rows = [_Row(prompt, output), _Row(prompt, output)]
    got = adjust_logits(logits, params, rows)
    ids = torch.tensor([prompt + output])
    allowed = PrefixConstrainedLogitsProcessor(lambda batch, sent: [2, 5, 31], 1)(
        ids, logits[0:1].clone())[0]
    bad = NoBadWordsLogitsProcessor([[6], [17, 8], [9, 11]], eos_token_id=0)(
        ids, logits[1:2].clone())[0]
    torch.testing.assert_close(got[0], allowed)
    torch.testing.assert_close(got[1], bad)
    assert torch.isinf(got[1][[6, 8]]).all() and torch.isfinite(got[1][11])  # 9 is not last
    assert int(sample(logits, params, [4, 4], rows)[0][0]) in (2, 5, 31)

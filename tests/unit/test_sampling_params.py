"""SamplingParams: vLLM-compatible defaults, validation, from_dict, to_sampler."""

import msgpack
import pytest

from cluster.contract.messages import SamplerParams, SeqChunk, SeqParams, StepPlan
from cluster.contract.sampling import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature) == (1, 16, 1.0)
    assert (p.top_p, p.top_k, p.min_p) == (1.0, -1, 0.0)
    assert p.seed is None and p.stop == [] and p.stop_token_ids == [] and p.ignore_eos is False
    assert p.logprobs is None


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"max_tokens": 0}, ValueError, ["max_tokens", "0"]),
    ({"max_tokens": "10"}, TypeError, ["max_tokens", "'10'"]),
    ({"max_tokens": 3.0}, TypeError, ["max_tokens"]),
    ({"max_tokens": True}, TypeError, ["max_tokens"]),
    ({"n": 0}, ValueError, ["n must", "0"]),
    ({"temperature": -0.5}, ValueError, ["temperature", "-0.5"]),
    ({"temperature": float("nan")}, ValueError, ["temperature"]),
    ({"temperature": "hot"}, TypeError, ["temperature", "'hot'"]),
    ({"top_p": 0.0}, ValueError, ["top_p", "0.0"]),
    ({"top_p": 1.5}, ValueError, ["top_p", "1.5"]),
    ({"min_p": -0.1}, ValueError, ["min_p", "-0.1"]),
    ({"min_p": 1.1}, ValueError, ["min_p", "1.1"]),
    ({"top_k": -2}, ValueError, ["top_k", "-2"]),
    ({"seed": "abc"}, TypeError, ["seed", "'abc'"]),
    ({"seed": 1 << 70}, ValueError, ["seed"]),
    ({"logprobs": -1}, ValueError, ["logprobs", "-1"]),
    ({"stop": 5}, TypeError, ["stop", "5"]),
    ({"stop": ["ok", ""]}, ValueError, ["stop"]),
    ({"stop": ["ok", "x" * 513]}, ValueError, ["stop", "512", "513"]),
    ({"stop_token_ids": [1, "x"]}, TypeError, ["stop_token_ids"]),
    ({"stop_token_ids": [-3]}, ValueError, ["stop_token_ids", "-3"]),
    ({"ignore_eos": "yes"}, TypeError, ["ignore_eos"]),
    ({"repetition_penalty": 0}, ValueError, ["repetition_penalty", "0"]),
    ({"frequency_penalty": 2.5}, ValueError, ["frequency_penalty", "2.5"]),
    ({"presence_penalty": "1"}, TypeError, ["presence_penalty"]),
    ({"logit_bias": {"5": 101}}, ValueError, ["logit_bias", "101"]),
    ({"logit_bias": {"x": 1}}, ValueError, ["logit_bias", "'x'"]),
    ({"logit_bias": [1, 2]}, TypeError, ["logit_bias"]),
    ({"min_tokens": 20, "max_tokens": 10}, ValueError, ["min_tokens", "20", "10"]),
])
def test_rejects_bad_values_naming_field_and_value(kwargs, exc, words):
    with pytest.raises(exc) as info:
        SamplingParams(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_accepts_edge_values_and_normalises():
    p = SamplingParams(temperature=0, top_p=1, min_p=1, top_k=0, logprobs=0, stop="END",
                       stop_token_ids=(7,), seed=-1)
    assert p.temperature == 0.0 and isinstance(p.top_p, float)
    assert p.stop == ["END"] and p.stop_token_ids == [7]


def test_from_dict_rejects_unknown_names_listing_accepted():
    with pytest.raises(ValueError) as info:
        SamplingParams.from_dict({"max_tokens": 4, "presence_pennalty": 1.0, "best_of": 2})
    msg = str(info.value)
    assert "best_of" in msg and "presence_pennalty" in msg
    assert "max_tokens" in msg.split("accepted")[1] and "top_p" in msg
    got = SamplingParams.from_dict({"max_tokens": 4, "top_k": 5})
    assert got == SamplingParams(max_tokens=4, top_k=5)


def test_to_sampler_carries_seed_and_encodes():
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, min_p=0.05, logprobs=3)
    s = p.to_sampler(seed=-1)
    assert s == SamplerParams(temperature=0.7, top_p=0.9, top_k=-1, min_p=0.05,
                              seed=(1 << 64) - 1, logprobs=3)
    assert not s.needs_history()
    chunk = SeqChunk(1, [1, 2], 0, [0], True)
    assert SeqChunk.from_list(msgpack.unpackb(msgpack.packb(chunk.to_list()))) == chunk
    penalized = SamplingParams(repetition_penalty=1.2, presence_penalty=0.5,
                               logit_bias={"7": -3, 9: 1.5}).to_sampler(seed=1)
    assert penalized.logit_bias == [[7, -3.0], [9, 1.5]] and penalized.repetition_penalty == 1.2
    assert penalized.needs_history()
    plan = StepPlan(3, [SeqChunk(1, [1, 2], 2, [0], True, None, [4, 4], [0, 2])],
                    [SeqParams(1, 1, penalized)], [0], [["key", [2], "{}"]])
    assert StepPlan.decode(plan.encode()) == plan

"""Speculative decoding (n-gram prompt lookup) end to end on the default model, in
deterministic mode, where a sequence's logits are the same bits in a verification step's rows
as in a one-token decode step (docs/ARCHITECTURE.md, "Speculative decoding"). The reference is
the same requests through an engine that does not speculate: with speculation on, every
request's tokens, logprobs, text, finish reason and prompt logprobs are the same, for greedy
and seeded sampling, penalties and a logit bias, a stop string, min_tokens, n=2, a short
max_tokens, prompt logprobs and a regex-constrained request (a grammar mask at each guessed
place) in one batch, whose prompts arrive in chunks beside the decoding rows; at tp=2 x pp=2 as well.
The requests ask to repeat or edit a passage, so that guesses are made and most are kept,
and the engine must have kept and rejected some."""

from __future__ import annotations

import re

import pytest

from cluster import LLM, SamplingParams
from cluster.serving.metrics import EngineMetrics

pytestmark = pytest.mark.slow

PASSAGE = ("The lighthouse keeper climbed the narrow stairs every evening at dusk. He trimmed "
           "the wick, polished the great lens, and wrote the weather in a leather book. Ships "
           "passed far out at sea, and none of them knew his name.")
PROMPTS = [f"Repeat this passage word for word.\n\n{PASSAGE}\n\nThe passage:",
           f"Rewrite this passage in the present tense.\n\n{PASSAGE}\n\nRewritten:",
           f"Copy the first sentence of this passage.\n\n{PASSAGE}\n\nCopy:"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
         "prompt_lookup_max": 4}
REQUESTS = [  # (prompt index, sampling parameters)
    (0, SamplingParams(max_tokens=40, temperature=0, logprobs=3, ignore_eos=True)),
    (0, SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=11, logprobs=2,
                       ignore_eos=True)),
    (0, SamplingParams(max_tokens=40, temperature=0.7, seed=5, ignore_eos=True,
                       repetition_penalty=1.05, frequency_penalty=0.6, presence_penalty=0.6,
                       logit_bias={279: -2.0, 260: 1.5})),  # mild: it still copies, and guesses
    (0, SamplingParams(max_tokens=40, temperature=0, stop=["great lens"])),
    (2, SamplingParams(max_tokens=40, temperature=0, min_tokens=14, stop_token_ids=[30])),  # "."
    (1, SamplingParams(max_tokens=24, temperature=1.0, seed=3, n=2, ignore_eos=True)),
    (0, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)),
    (2, SamplingParams(max_tokens=20, temperature=0, prompt_logprobs=2, ignore_eos=True)),
    (0, SamplingParams(max_tokens=24, temperature=0.8, seed=6,
                       structured_outputs={"regex": r"The [a-z]+( [a-z]+){3,12}\."})),
]


def _outputs(outs) -> list:
    return [(out.prompt_logprobs, [(c.token_ids, c.logprobs, c.text, c.finish_reason)
                                   for c in out.outputs]) for out in outs]


def _run(**settings) -> tuple[list, dict | None, str, tuple]:
    """The batch's outputs, the speculator's counts and metrics after it, and the constrained
    request run again alone (its output, and the guesses made and kept meanwhile)."""
    llm = LLM(deterministic=True, cpus_per_worker=0.5, kv_cache_bytes=64 << 20,
              max_num_batched_tokens=64, **settings)
    try:
        outs = llm.generate([PROMPTS[i] for i, _ in REQUESTS], [p for _, p in REQUESTS])
        spec, metrics = llm.engine.speculator, EngineMetrics("default")
        metrics.observe_engine(llm.engine)
        stats = spec and spec.stats()
        i, params = REQUESTS[-1]
        alone = _outputs(llm.generate([PROMPTS[i]], params))[0]
        guessed = spec and (spec.num_draft_tokens - stats["spec_num_draft_tokens"],
                            spec.num_accepted_tokens - stats["spec_num_accepted_tokens"])
        return _outputs(outs), stats, metrics.text(), (alone, guessed)
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def reference(ray_session):
    outputs, stats, _, (alone, _) = _run(name="spec-reference")
    assert stats is None and alone == outputs[-1]
    return outputs


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)], ids=["tp1", "tp2-pp2"])
def test_speculating_gives_the_tokens_of_decoding_one_at_a_time(reference, tp, pp):
    outputs, stats, metrics, (alone, guessed) = _run(
        name=f"spec-{tp}-{pp}", speculative_config=NGRAM, tensor_parallel_size=tp,
        pipeline_parallel_size=pp)
    for (i, params), want, got in zip(REQUESTS, reference, outputs):
        assert got == want, (PROMPTS[i][:30], params)
    # the constrained request alone: its grammar's masks at guessed places, guesses kept
    assert alone == reference[-1] and re.fullmatch(REQUESTS[-1][1].structured_outputs.spec()[1],
                                                   alone[1][0][2])
    assert guessed[1] > 0, guessed
    stopped, late = reference[3][1][0], reference[4][1][0]
    assert stopped[3] == "stop" and not stopped[2].endswith("great lens")
    # the "." after "dusk" was banned before min_tokens; a later one ended the output
    assert late[3] == "stop" and late[0][-1] == 30 and len(late[0]) > 14 and "dusk." not in late[2]
    assert len(reference[6][1][0][0]) == 3
    # guesses were made, most of them kept, some rejected (the seeded rows disagree more)
    assert stats["spec_num_draft_tokens"] > stats["spec_num_accepted_tokens"] \
        > stats["spec_num_draft_tokens"] / 2
    assert stats["spec_accepted_per_pos"][0] >= stats["spec_accepted_per_pos"][-1] > 0

    def metric(name: str, labels: str = "") -> float:
        found = re.search(rf"^shardlm:{name}{{[^}}]*{labels}[^}}]*}} (\S+)$", metrics, re.M)
        return float(found.group(1))

    assert metric("spec_decode_num_drafts_total") == stats["spec_num_drafts"]
    assert metric("spec_decode_num_draft_tokens_total") == stats["spec_num_draft_tokens"]
    assert metric("spec_decode_num_accepted_tokens_total") == stats["spec_num_accepted_tokens"]
    for place, kept in enumerate(stats["spec_accepted_per_pos"]):
        assert metric("spec_decode_num_accepted_tokens_per_pos_total",
                      f'position="{place}"') == kept


def test_suffix_decoding_guesses_from_the_deployments_earlier_outputs(ray_session):
    """A free-generation request (nothing to copy from its prompt) asked twice: the second
    time the suffix cache holds the first output and most of the second is guessed and kept;
    the output is the same both times, and the same as the n-gram method's."""
    prompt = "Write a short poem about the autumn wind."
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    runs = {}
    for method in ("ngram", "suffix"):
        llm = LLM(deterministic=True, cpus_per_worker=0.5, kv_cache_bytes=64 << 20,
                  name=f"spec-{method}", speculative_config={
                      "method": method, "num_speculative_tokens": 4})
        try:
            spec, kept = llm.engine.speculator, []
            for _ in range(2):
                before = spec.num_accepted_tokens
                out = llm.generate([prompt], params)[0].outputs[0]
                kept.append((out.token_ids, spec.num_accepted_tokens - before))
            runs[method] = kept
        finally:
            llm.shutdown()
    (first, _), (second, kept) = runs["suffix"]
    assert first == second == runs["ngram"][0][0] == runs["ngram"][1][0]
    assert kept >= 12 and kept > 2 * runs["ngram"][1][1], runs

"""A request that makes every step it is in fail (a worker raises; here the fault injection
``fault.poison_token_id``) is found by bisecting the batch and failed alone, with the error;
every other request of the same batch finishes exactly as in a run without it."""

from __future__ import annotations

import pytest

from cluster import LLM, SamplingParams
from tests.checkpoints import write_tiny_checkpoint

POISON = 149


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("isolation"), seed=6)


def _prompts() -> list[list[int]]:
    prompts = [[(13 * i + 7 * j) % 140 + 1 for j in range(6 + i)] for i in range(7)]
    prompts[4][2] = POISON  # only this prompt holds the poisoned token
    return prompts


def test_the_poisoned_request_fails_alone(ray_session, tiny):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    common = dict(model=str(tiny), dtype="float32", tensor_parallel_size=1, cpus_per_worker=0.5,
                  kv_cache_bytes=1 << 22, name="isolation", namespace="isolation",
                  restart_backoff_s=0.1)
    clean = [p for i, p in enumerate(_prompts()) if i != 4]
    with LLM(**common) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=clean,
                                                            sampling_params=params)]
    with LLM(**common, poison_token_id=POISON) as llm:
        outputs = llm.generate(prompt_token_ids=_prompts(), sampling_params=params)
        restarts = llm.engine.stats.get("restarts", 0)
    poisoned = outputs.pop(4).outputs[0]
    assert poisoned.finish_reason == "abort"
    assert "isolated and failed alone" in poisoned.error and "fault injected" in poisoned.error
    assert [o.outputs[0].token_ids for o in outputs] == want
    assert all(o.outputs[0].error is None for o in outputs)
    print(f"7 requests, one poisoned: isolated after {restarts} gang restarts")
    assert restarts <= 5  # bisection: about log2(7) + 1 rounds, not one per request


def test_a_request_that_hangs_every_step_fails_alone(ray_session, tiny):
    """The same when the poisoned steps hang past ``fault.step_timeout_s`` instead of
    raising (a request that stalls its gang, e.g. a kernel that never returns on its shapes):
    timeouts are bisected like errors. Before, each timeout rebuilt the gang and replayed the
    whole batch into the same hang until the restart budget ran out and every request
    failed."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    common = dict(model=str(tiny), dtype="float32", tensor_parallel_size=1, cpus_per_worker=0.5,
                  kv_cache_bytes=1 << 22, name="isolation-hang", namespace="isolation-hang",
                  restart_backoff_s=0.1, max_restarts=8)
    prompts = _prompts()[:4] + [_prompts()[4]]  # the poisoned one last
    with LLM(**common) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts[:4],
                                                            sampling_params=params)]
    with LLM(**common, poison_token_id=POISON, poison_hang_s=60.0, step_timeout_s=3.0) as llm:
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        restarts = llm.engine.stats.get("restarts", 0)
    poisoned = outputs.pop().outputs[0]
    assert poisoned.finish_reason == "abort"
    assert "isolated and failed alone" in poisoned.error and "step_timeout_s" in poisoned.error
    assert [o.outputs[0].token_ids for o in outputs] == want
    assert all(o.outputs[0].error is None for o in outputs)
    print(f"5 requests, one hanging its steps: isolated after {restarts} gang restarts")

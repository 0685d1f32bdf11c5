"""What speculative decoding gains: the same requests through two engines of the default model
in one process, one without speculation and one with it, run in turns at each concurrency.

Two workloads. Input-grounded: each prompt (the chat template around it) asks to repeat,
summarize or edit a passage, the passages being the docstrings of Python's own standard
library modules (text that ships with the interpreter, nothing downloaded). Free generation:
short open questions. Greedy, ``ignore_eos``, a fixed number of new tokens. Per workload and
concurrency: the output tokens/s and the median time per output token of each engine, the
speedup, the share of guesses kept and the tokens a speculating sequence gains per step
(kept guesses per draft, plus one), and whether the two engines' tokens were the same (they
are by construction in deterministic mode; in the default mode a verification row's logits
may differ from a decode row's in the last bits, as they do with the batch's other rows).

    shardlm bench --speculative [--speculative-config JSON] [--deterministic]
    python -m cluster.tools.speculative_bench --concurrency 1,4,16
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import statistics
from pathlib import Path

DEFAULT_SPEC = {"method": "ngram", "num_speculative_tokens": 4}
MODULES = ["json", "argparse", "textwrap", "functools", "itertools", "collections", "pathlib",
           "logging", "subprocess", "tempfile", "shutil", "heapq", "bisect", "string",
           "fractions", "statistics", "calendar", "csv", "zipfile", "gzip", "difflib",
           "pprint", "contextlib", "dataclasses", "enum", "typing", "uuid", "base64"]
TASKS = ["Repeat the following text exactly, word for word.",
         "Summarize the following documentation in two sentences, quoting its key terms.",
         "Edit the following text: fix any grammar, keep everything else unchanged."]
QUESTIONS = ["Why is the sky blue?", "Give three tips for learning a new language.",
             "What makes a good cup of coffee?", "Describe a day at the beach.",
             "How do bees make honey?", "Write a short poem about autumn.",
             "What is the difference between weather and climate?",
             "Explain how a bicycle stays upright.", "Name some uses of a paperclip.",
             "What should I pack for a weekend camping trip?",
             "Tell me a fun fact about octopuses.", "How does a refrigerator keep food cold?"]


def passages(count: int, words: int = 90) -> list[str]:
    """``count`` passages of up to ``words`` words from the standard library's docstrings."""
    out = []
    for name in MODULES:
        doc = inspect.getdoc(importlib.import_module(name)) or ""
        text = " ".join(doc.split()[:words])
        if len(text.split()) >= 30:
            out.append(text)
    return [out[i % len(out)] for i in range(count)]


def workloads(llm, requests: int) -> dict[str, list[list[int]]]:
    """Each workload's prompts as token ids (the chat template applied)."""
    def chat(text: str) -> list[int]:
        return llm.chat_token_ids([{"role": "user", "content": text}])

    grounded = [chat(f"{TASKS[i % len(TASKS)]}\n\n{passage}")
                for i, passage in enumerate(passages(requests))]
    free = [chat(QUESTIONS[i % len(QUESTIONS)]) for i in range(requests)]
    return {"input-grounded": grounded, "free": free}


def run(spec: dict, concurrencies: list[int], requests: int, output_len: int, rounds: int,
        **settings) -> list[dict]:
    from cluster import LLM
    from cluster.bench.drive import drive, summarize
    from cluster.bench.options import BenchOptions

    engines = {"off": LLM(name="spec-bench-off", **settings),
               "on": LLM(name="spec-bench-on", speculative_config=spec, **settings)}
    opts = BenchOptions()
    rows = []
    try:
        for workload, prompts in workloads(engines["off"], max(concurrencies) * requests).items():
            for c in concurrencies:
                batch = prompts[:c * requests]
                figures = {"off": [], "on": []}
                tokens, counts = {}, None
                for _ in range(rounds):
                    for name, llm in engines.items():
                        spec_before = _spec_counts(llm.engine)
                        raw = drive(llm.engine, batch, output_len, c, opts)
                        figures[name].append(summarize(raw, batch, c))
                        tokens[name] = raw["tokens"]
                        if name == "on":
                            counts = _spec_delta(spec_before, _spec_counts(llm.engine), counts)
                rows.append(_row(workload, c, figures, counts, tokens))
                _print(rows[-1])
    finally:
        for llm in engines.values():
            llm.shutdown()
    return rows


def _spec_counts(engine) -> tuple[int, int, int]:
    s = engine.speculator
    return (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) if s else (0, 0, 0)


def _spec_delta(before, after, total) -> tuple[int, int, int]:
    delta = tuple(a - b for a, b in zip(after, before))
    return delta if total is None else tuple(t + d for t, d in zip(total, delta))


def _row(workload: str, concurrency: int, figures: dict, counts, tokens: dict) -> dict:
    def median(name: str, key: str, sub: str | None = None) -> float:
        values = [f[key][sub] if sub else f[key] for f in figures[name]]
        return statistics.median(values)

    drafts, guessed, kept = counts
    off_tps, on_tps = median("off", "output_tokens_per_s"), median("on", "output_tokens_per_s")
    return {"workload": workload, "concurrency": concurrency,
            "tpot_ms_off": median("off", "tpot_s", "p50") * 1e3,
            "tpot_ms_on": median("on", "tpot_s", "p50") * 1e3,
            "tokens_per_s_off": off_tps, "tokens_per_s_on": on_tps, "speedup": on_tps / off_tps,
            "acceptance": kept / guessed if guessed else 0.0,
            "tokens_per_step": 1 + kept / drafts if drafts else 1.0,
            "same_tokens": sum(a == b for a, b in zip(tokens["off"], tokens["on"])),
            "requests": len(tokens["off"])}


def _print(row: dict) -> None:
    print(f"{row['workload']:15} c={row['concurrency']:<3} TPOT {row['tpot_ms_off']:7.2f} -> "
          f"{row['tpot_ms_on']:7.2f} ms   tok/s {row['tokens_per_s_off']:7.1f} -> "
          f"{row['tokens_per_s_on']:7.1f} (x{row['speedup']:.2f})   kept {row['acceptance']:.0%}"
          f" of guesses, {row['tokens_per_step']:.2f} tokens/step   same tokens "
          f"{row['same_tokens']}/{row['requests']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    import ray
    import torch

    from layers.cpu.flags import cpu_flags

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speculative-config", type=json.loads, default=DEFAULT_SPEC,
                        metavar="JSON", help=f"default {json.dumps(DEFAULT_SPEC)}")
    parser.add_argument("--concurrency", default="1,4,16",
                        help="comma-separated concurrencies (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=2, help="requests per concurrency slot")
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each engine, in turns")
    parser.add_argument("--model")
    parser.add_argument("--dtype")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    print(f"CPU flags: {' '.join(flags)}; {torch.get_num_threads()} threads; "
          f"speculative_config {json.dumps(args.speculative_config)}", flush=True)
    settings = {k: v for k, v in (("model", args.model), ("dtype", args.dtype)) if v}
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows = run(args.speculative_config, [int(c) for c in args.concurrency.split(",")],
               args.requests, args.output_len, args.rounds, deterministic=args.deterministic,
               kv_cache_bytes=256 << 20, cpus_per_worker=0.5, **settings)
    if args.json:
        Path(args.json).write_text(json.dumps({"flags": flags, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

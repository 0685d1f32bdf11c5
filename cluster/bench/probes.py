"""The probes of ``shardlm bench``, measured in rounds beside the machine's ceilings.

A shared machine's speed drifts by 10-20% within minutes, so a figure measured at one moment
against a ceiling measured at another says more about the drift than about the engine. The
probes therefore run in rounds (``--probe-rounds``, default 5): each round measures the
ceilings (``cluster.bench.baseline.machine_ceilings``) and then runs each kind of probe on
every engine of the run in turn (the others idle), so that the engines' figures of a kind
are taken seconds apart; the engines' order alternates from round to round. Each round's
fractions (prefill against matmul FLOP/s, batch-1 decode against read bandwidth) and tp
ratios (decode step at batch 32 against the smallest tp) compare moments seconds apart; the
report gives the median over rounds of each figure and keeps every round in the JSON.

The probes (after the engine's warm-up request; ``probe``): prefill of one prompt of the
workload's longest length in one step; decode at batch 1 (median of 32 steps, 16-token
prompt); the decode step at batch 32 (32 sequences of 16 prompt tokens decoding together,
median of 16 steps). Every engine gets the same prompts in a round.
"""

from __future__ import annotations

import random
import statistics

from cluster.bench.drive import _median_step, drive, progress
from cluster.bench.options import BenchOptions

PROBE_PROMPT = 16  # prompt tokens of the decode probes
B1_STEPS, BATCH_STEPS = 32, 16  # decode steps timed per probe (the median is kept)
PROBE_KINDS = ("prefill", "b1", "batch")


def probe(engine, opts: BenchOptions, vocab_size: int, kind: str, seed: int) -> dict:
    """One probe of one engine (raw step times): ``kind`` is "prefill" (one prompt of the
    workload's longest length in one step), "b1" (decode at batch 1) or "batch" (decode at
    batch 32, or ``max_num_seqs`` if smaller)."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(vocab_size) for _ in range(k)]
    if kind == "prefill":
        cap = min(opts.prompt_len[1], engine.scheduler.max_num_batched_tokens,
                  engine.max_model_len - 2)
        return {"prefill_tokens": cap,
                "prefill_s": _median_step(drive(engine, [ids(cap)], 1, 1, opts), cap, 0)}
    if kind == "b1":
        trace = drive(engine, [ids(PROBE_PROMPT)], B1_STEPS + 1, 1, opts)
        return {"decode_b1_step_s": _median_step(trace, 0, 1)}
    batch = min(32, engine.config.scheduler.max_num_seqs)
    trace = drive(engine, [ids(PROBE_PROMPT) for _ in range(batch)], BATCH_STEPS + 1, batch, opts)
    return {"decode_batch": batch, "decode_batch_step_s": _median_step(trace, 0, batch)}


def median_fields(rounds: list[dict]) -> dict:
    """Each numeric field's median over the rounds (rounds without it are skipped); other
    fields (names, devices) as the first round has them."""
    out = {}
    for key in dict.fromkeys(k for r in rounds for k in r):
        values = [r[key] for r in rounds if isinstance(r.get(key), (int, float))]
        out[key] = statistics.median(values) if values else next(
            r[key] for r in rounds if key in r)
    return out


def probe_rounds(engines: list, opts: BenchOptions, vocab_size: int, threads: list[int],
                 device: str) -> list[dict]:
    """Run ``opts.probe_rounds`` rounds: the ceilings at each thread count, then each engine's
    probes. Returns each round's ceilings ({str(threads): ceilings}) and stores each engine's
    raw probes, with the round's ceilings at its thread count, in its result under
    ``"probe_rounds"``. ``engines``: (engine, result) pairs."""
    from cluster.bench.baseline import machine_ceilings

    ceilings = []
    for i in range(opts.probe_rounds):
        progress(opts, f"probes, round {i + 1}/{opts.probe_rounds}: machine ceilings at "
                       f"{threads} thread(s), then prefill and decode at batch 1 and 32 for tp="
                       + ",".join(str(r["tp"]) for _, r in engines))
        ceilings.append({str(t): machine_ceilings(t, device) for t in threads})
        found: dict[int, dict] = {id(result): {} for _, result in engines}
        for k, kind in enumerate(PROBE_KINDS):  # one kind for every engine, then the next
            for engine, result in engines if i % 2 == 0 else engines[::-1]:
                seed = (opts.seed + 1) * 1000 + 10 * i + k  # the same prompts for every engine
                found[id(result)] |= probe(engine, opts, vocab_size, kind, seed)
        for _, result in engines:
            result.setdefault("probe_rounds", []).append(
                (found[id(result)], ceilings[-1][str(result["threads"])]))
    return ceilings


def summarize_rounds(runs: list[dict], ceilings: list[dict], counts: dict) -> dict:
    """Per round: each run's roofline against that round's ceilings; then the medians.
    Sets ``run["roofline"]`` (medians, and ``"rounds"``); returns the ceilings' medians over
    every round, by thread count (each with its ``"rounds"``)."""
    from cluster.bench.baseline import roofline

    for r in runs:
        if "probe_rounds" in r:
            dtype_bytes = 1 if r.get("quantization") == "int8" else {"float32": 4}.get(r["dtype"], 2)
            per_round = [roofline(p, counts, dtype_bytes, c) for p, c in r.pop("probe_rounds")]
            r["roofline"] = median_fields(per_round) | {"rounds": per_round}
    by_threads: dict[str, list] = {}
    for c in ceilings:
        for t, values in c.items():
            by_threads.setdefault(t, []).append(values)
    return {t: median_fields(v) | {"rounds": v} for t, v in by_threads.items()}


def tp_scaling(runs: list[dict]) -> list[dict]:
    """Decode step time at batch 32 of each tp against the smallest tp of the same precision,
    round by round."""
    out = []
    for r in (r for r in runs if "roofline" in r):
        same = [b for b in runs if "roofline" in b and b.get("precision") == r.get("precision")]
        base = min(same, key=lambda b: b["tp"])
        if r is base:
            continue
        per_round = [a["decode_batch_step_s"] / b["decode_batch_step_s"]
                     for a, b in zip(r["roofline"]["rounds"], base["roofline"]["rounds"])
                     if a.get("decode_batch_step_s") and b.get("decode_batch_step_s")]
        if per_round:
            out.append({"tp": r["tp"], "vs_tp": base["tp"], "decode_batch": r["roofline"]["decode_batch"],
                        "decode_batch_step_ratio": statistics.median(per_round),
                        "rounds": per_round})
    return out

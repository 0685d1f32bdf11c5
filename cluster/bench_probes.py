"""The probes of ``shardlm bench``, measured in rounds beside the machine's ceilings.

A shared machine's speed drifts by 10-20% within minutes, so a figure measured at one moment
against a ceiling measured at another says more about the drift than about the engine. The
probes therefore run in rounds (``--probe-rounds``, default 3): each round measures the
ceilings (``cluster.bench_baseline.machine_ceilings``) and then probes every engine of the
run once, one after the other, while the others sit idle. Each round's fractions (prefill
against matmul FLOP/s, batch-1 decode against read bandwidth) and tp ratios (decode step at
batch 32 against the smallest tp) compare moments seconds apart; the report gives the median
over rounds of each figure and keeps every round in the JSON.

One round's probes of an engine (after the engine's warm-up request): prefill of one prompt
of the workload's longest length in one step; decode at batch 1 (median step, 16-token
prompt, 32 steps); the decode step at batch 32 (32 sequences of 16 prompt tokens decoding
together, median of 8 steps).
"""

from __future__ import annotations

import random
import statistics
from typing import TYPE_CHECKING

from cluster.bench_drive import _median_step, drive, progress

if TYPE_CHECKING:
    from cluster.bench import BenchOptions

PROBE_PROMPT = 16  # prompt tokens of the decode probes


def probe_once(engine, opts: BenchOptions, vocab_size: int, seed: int) -> dict:
    """One round's probes of one engine (raw step times)."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(vocab_size) for _ in range(k)]
    cap = min(opts.prompt_len[1], engine.config.scheduler.max_num_batched_tokens,
              engine.max_model_len - 2)
    prefill = _median_step(drive(engine, [ids(cap)], 1, 1, opts), cap, 0)
    b1 = drive(engine, [ids(PROBE_PROMPT)], 33, 1, opts)
    batch = min(32, engine.config.scheduler.max_num_seqs)
    b32 = drive(engine, [ids(PROBE_PROMPT) for _ in range(batch)], 9, batch, opts)
    return {"prefill_tokens": cap, "prefill_s": prefill,
            "decode_b1_step_s": _median_step(b1, 0, 1), "decode_batch": batch,
            "decode_batch_step_s": _median_step(b32, 0, batch)}


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
    from cluster.bench_baseline import machine_ceilings

    ceilings = []
    for i in range(opts.probe_rounds):
        progress(opts, f"probes, round {i + 1}/{opts.probe_rounds}: machine ceilings at "
                       f"{threads} thread(s), then prefill and decode at batch 1 and 32 for tp="
                       + ",".join(str(r["tp"]) for _, r in engines))
        ceilings.append({str(t): machine_ceilings(t, device) for t in threads})
        for engine, result in engines:
            probe = probe_once(engine, opts, vocab_size, opts.seed + 1 + i)
            result.setdefault("probe_rounds", []).append((probe, ceilings[-1][str(result["threads"])]))
    return ceilings


def summarize_rounds(runs: list[dict], ceilings: list[dict], counts: dict) -> dict:
    """Per round: each run's roofline against that round's ceilings; then the medians.
    Sets ``run["roofline"]`` (medians, and ``"rounds"``); returns the ceilings' medians over
    every round, by thread count (each with its ``"rounds"``)."""
    from cluster.bench_baseline import roofline

    for r in runs:
        if "probe_rounds" in r:
            dtype_bytes = {"float32": 4}.get(r["dtype"], 2)
            per_round = [roofline(p, counts, dtype_bytes, c) for p, c in r.pop("probe_rounds")]
            r["roofline"] = median_fields(per_round) | {"rounds": per_round}
    by_threads: dict[str, list] = {}
    for c in ceilings:
        for t, values in c.items():
            by_threads.setdefault(t, []).append(values)
    return {t: median_fields(v) | {"rounds": v} for t, v in by_threads.items()}


def tp_scaling(runs: list[dict]) -> list[dict]:
    """Decode step time at batch 32 of each tp against the smallest tp, round by round."""
    probed = [r for r in runs if "roofline" in r]
    if len(probed) < 2:
        return []
    base = min(probed, key=lambda r: r["tp"])
    out = []
    for r in probed:
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

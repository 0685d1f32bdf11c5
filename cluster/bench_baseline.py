"""Reference figures for ``shardlm bench``: the machine's ceilings, the roofline fractions
measured against them, a transformers baseline, and the side-by-side report (table, plot).

Ceilings (measured with torch in the driver process, at a given thread count, best of
several repetitions so that a busy neighbour lowers them as little as possible):

- ``matmul_flops``: fp32 (2048 x 2048) @ (2048 x 2048), 2 n^3 FLOP per product;
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
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from math import prod
from pathlib import Path

import torch

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


def machine_ceilings(threads: int, device: str = "cpu", n: int = 2048,
                     stream_bytes: int = 256 << 20) -> dict:
    """Peak fp32 matmul FLOP/s and memory bandwidth at ``threads`` torch threads."""
    with torch_threads(threads), torch.inference_mode():
        a = torch.randn(n, n, device=device)  # (n, n)
        b = torch.randn(n, n, device=device)
        matmul_s = _best_time(lambda: a @ b, device)
        x = torch.rand(stream_bytes // 4, device=device)  # (elements,) fp32
        y = torch.empty_like(x)
        read_s = _best_time(lambda: x.sum(), device)
        copy_s = _best_time(lambda: y.copy_(x), device)
    return {"threads": threads, "device": device, "matmul_n": n,
            "matmul_flops": 2 * n ** 3 / matmul_s,
            "read_bytes_per_s": stream_bytes / read_s,
            "copy_bytes_per_s": 2 * stream_bytes / copy_s}


def weight_counts(model_dir: Path, hf_config: dict) -> dict:
    """Parameter counts from the safetensors headers (no weights are read): ``blocks`` is
    every weight a token passes through except the embedding and LM head."""
    from safetensors import safe_open

    blocks = total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                numel = prod(f.get_slice(name).get_shape())
                total += numel
                if not name.endswith(("embed_tokens.weight", "lm_head.weight")):
                    blocks += numel
    lm_head = hf_config["vocab_size"] * hf_config["hidden_size"]
    return {"total": total, "blocks": blocks, "lm_head": lm_head}


def roofline(probe: dict, counts: dict, dtype_bytes: int, ceilings: dict) -> dict:
    """Prefill against matmul FLOP/s, batch-1 decode against read bandwidth (see cluster.bench)."""
    flops = 2 * counts["blocks"] * probe["prefill_tokens"] + 2 * counts["lm_head"]
    bytes_per_token = (counts["blocks"] + counts["lm_head"]) * dtype_bytes
    out = dict(probe, prefill_flops=flops, prefill_flops_per_s=flops / probe["prefill_s"],
               decode_weight_bytes_per_token=bytes_per_token)
    out["prefill_fraction_of_matmul"] = out["prefill_flops_per_s"] / ceilings["matmul_flops"]
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
RUN_COLUMNS = [("engine", -16), ("tp", 2), ("thr", 3), ("conc", 4), ("wall s", 7),
               ("out tok/s", 9), ("req/s", 6), ("TTFT p50/90/99 ms", 23),
               ("TPOT p50/90/99 ms", 20), ("KV peak", 7), ("drv ovh", 7),
               ("peak RSS MiB/worker", -19)]
ROOF_COLUMNS = [("roofline", -8), ("prefill tok", 11), ("prefill s", 9), ("GFLOP/s", 7),
                ("of matmul", 9), ("b1 ms/tok", 9), ("GB/s", 6), ("of read bw", 10),
                ("b32 ms/step", 11), ("b32 tok/s", 9)]


def _row(cells: list[tuple]) -> str:
    """Cells joined by a space, each padded to its width (negative: left-aligned)."""
    return " ".join(f"{str(c):<{-w}}" if w < 0 else f"{str(c):>{w}}" for c, w in cells).rstrip()


def _pct(d: dict | None, scale: float, fmt: str = "{:.0f}") -> str:
    return "/".join(fmt.format(d[k] * scale) for k in ("p50", "p90", "p99")) if d else "-"


def format_report(result: dict) -> str:
    w, m = result["workload"], result["machine"]
    lines = [f"workload: {w['num_requests']} requests, prompts {w['prompt_len'][0]}-{w['prompt_len'][1]} "
             f"tokens ({w['prompt_tokens']} in all; {w['prompts']}, seed {w['seed']}), "
             f"{w['output_len']} output tokens each (greedy, ignore_eos)",
             f"model: {result['model']['dir']} ({result['model']['params']['total'] / 1e6:.1f} M params)",
             f"machine: {m['cpus']} CPUs, load average {m['load_average_start'][0]:.2f} at start, "
             f"{m['load_average_end'][0]:.2f} at end",
             "", f"{'ceilings':<16}{'threads':>8}{'matmul GFLOP/s':>16}{'read GB/s':>11}{'copy GB/s':>11}"]
    for c in m["ceilings"].values():
        lines.append(f"{'':<16}{c['threads']:>8}{c['matmul_flops'] / 1e9:>16.1f}"
                     f"{c['read_bytes_per_s'] / 1e9:>11.1f}{c['copy_bytes_per_s'] / 1e9:>11.1f}")
    lines += ["", _row(RUN_COLUMNS)]
    for r in result["shardlm"] + result["baseline"]:
        for p in r["points"]:
            rss = "/".join(f"{v / 2**20:.0f}" for v in p.get("worker_peak_rss_bytes", {}).values())
            name = r["engine"] + (f" b{p['batch_size']}" if "batch_size" in p else "")
            cells = [name, r.get("tp", "-"), r["threads"], p["concurrency"], f"{p['wall_s']:.1f}",
                     f"{p['output_tokens_per_s']:.1f}", f"{p['requests_per_s']:.2f}",
                     _pct(p["ttft_s"], 1e3), _pct(p["tpot_s"], 1e3, "{:.1f}")]
            if "steps" in p:
                cells += [f"{p['kv_usage_peak']:.0%}", f"{p['driver_overhead_fraction']:.1%}", rss]
            else:
                cells += ["-", "-", f"identical greedy outputs: {p.get('identical_to_shardlm', '-')}"
                                    f"/{p['requests']}"]
            lines.append(_row(list(zip(cells, [w for _, w in RUN_COLUMNS]))))
    for q in result["ratios"]:
        lines.append(f"shardlm tp={q['tp']} / transformers at {q['threads']} thread(s), concurrency "
                     f"{q['concurrency']}: {q['ratio']:.2f}x")
    roof = [r for r in result["shardlm"] if "roofline" in r]
    if roof:
        lines += ["", _row(ROOF_COLUMNS)]
        for r in roof:
            f = r["roofline"]
            cells = [f"tp={r['tp']}", f["prefill_tokens"], f"{f['prefill_s']:.3f}",
                     f"{f['prefill_flops_per_s'] / 1e9:.1f}", f"{f['prefill_fraction_of_matmul']:.1%}",
                     f"{(f['decode_b1_step_s'] or 0) * 1e3:.1f}",
                     f"{f.get('decode_b1_bytes_per_s', 0) / 1e9:.2f}",
                     f"{f.get('decode_b1_fraction_of_read_bw', 0):.1%}",
                     f"{(f['decode_batch_step_s'] or 0) * 1e3:.1f}",
                     f"{f.get('decode_batch_tokens_per_s', 0):.1f}"]
            lines.append(_row(list(zip(cells, [w for _, w in ROOF_COLUMNS]))))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Throughput, TTFT and TPOT percentiles against concurrency, shardlm beside the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    series = [(f"shardlm tp={r['tp']}", r) for r in result["shardlm"]]
    series += [(f"transformers {r['threads']} thr", r) for r in result["baseline"]]
    for i, (name, r) in enumerate(series):
        color = f"C{i}"
        conc = [p["concurrency"] for p in r["points"]]
        axes[0].plot(conc, [p["output_tokens_per_s"] for p in r["points"]], "o-", color=color, label=name)
        for ax, key in ((axes[1], "ttft_s"), (axes[2], "tpot_s")):
            for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
                ax.plot(conc, [p[key][q] * 1e3 if p[key] else float("nan") for p in r["points"]],
                        style, color=color, label=f"{name} {q}")
    titles = ("output tokens/s", "TTFT ms (p50 - / p90 -- / p99 :)", "TPOT ms (p50 - / p90 -- / p99 :)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    w = result["workload"]
    fig.suptitle(f"{w['num_requests']} requests, prompts {w['prompt_len'][0]}-{w['prompt_len'][1]}, "
                 f"{w['output_len']} output tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

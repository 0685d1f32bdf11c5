"""The side-by-side report of ``shardlm bench``: a table on stdout and an optional plot."""

from __future__ import annotations

RUN_COLUMNS = [("engine", -20), ("tp", 2), ("thr", 3), ("conc", 4), ("wall s", 7),
               ("out tok/s", 9), ("req/s", 6), ("TTFT p50/90/99 ms", 23),
               ("TPOT p50/90/99 ms", 20), ("KV peak", 7), ("drv ovh", 7),
               ("peak RSS MiB/worker", -19)]
ROOF_COLUMNS = [("roofline", -14), ("prefill tok", 11), ("prefill s", 9), ("GFLOP/s", 7),
                ("of matmul", 9), ("b1 ms/tok", 9), ("GB/s", 6), ("of read bw", 10),
                ("bN ms/step", 11), ("bN tok/s", 9)]  # N: the batch probed (32, or max_num_seqs)


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
             *([f"cpu: {m['cpu']['model']}; flags: {' '.join(m['cpu']['flags']) or 'none of note'}"
                + (f" (kernels built for {m['cpu']['kernel_isa']})" if "kernel_isa" in m["cpu"] else "")]
               if "cpu" in m else []),
             "", f"{'ceilings':<16}{'threads':>8}{'matmul GFLOP/s':>16}{'bf16 GFLOP/s':>14}"
                 f"{'read GB/s':>11}{'copy GB/s':>11}  (median of the rounds; each round's read GB/s)"]
    unmeasured = []  # why a bf16 ceiling is missing (cluster.bench.baseline.machine_ceilings)
    for c in m["ceilings"].values():
        each = ", ".join(f"{r['read_bytes_per_s'] / 1e9:.1f}" for r in c.get("rounds", []))
        bf16, why = c.get("matmul_bf16_flops"), c.get("matmul_bf16") or "not measured"
        if bf16 is None and why not in unmeasured:
            unmeasured.append(why)
        lines.append(f"{'':<16}{int(c['threads']):>8}{c['matmul_flops'] / 1e9:>16.1f}"
                     f"{'n/a' if bf16 is None else f'{bf16 / 1e9:.1f}':>14}"
                     f"{c['read_bytes_per_s'] / 1e9:>11.1f}{c['copy_bytes_per_s'] / 1e9:>11.1f}"
                     f"  ({each})")
    lines += [f"bf16 GFLOP/s n/a: {why}; a bf16 run's prefill is set against the fp32 matmul"
              for why in unmeasured]
    lines += ["", _row(RUN_COLUMNS)]
    for r in result["shardlm"] + result["baseline"]:
        for p in r["points"]:
            rss = "/".join(f"{v / 2**20:.0f}" for v in p.get("worker_peak_rss_bytes", {}).values())
            name = r["engine"] + (f" b{p['batch_size']}" if "batch_size" in p else "")
            name += f" {p['request_rate']}/s" if "request_rate" in p else ""
            cells = [name, r.get("tp", "-"), r["threads"], p["concurrency"], f"{p['wall_s']:.1f}",
                     f"{p['output_tokens_per_s']:.1f}", f"{p['requests_per_s']:.2f}",
                     _pct(p["ttft_s"], 1e3), _pct(p["tpot_s"], 1e3, "{:.1f}")]
            if "kv_usage_peak" in p:  # shardlm (the driver overhead: offline only)
                overhead = p.get("driver_overhead_fraction")
                cells += [f"{p['kv_usage_peak']:.0%}", "-" if overhead is None else f"{overhead:.1%}", rss]
            elif "peer" in r:
                cells += ["-", "-", f"peer at {r['peer']}"]
            else:
                cells += ["-", "-", f"identical greedy outputs: {p.get('identical_to_shardlm', '-')}"
                                    f"/{p['requests']}"]
            lines.append(_row(list(zip(cells, [w for _, w in RUN_COLUMNS]))))
    for r in result["shardlm"]:
        if r.get("bytes_read_at_load"):
            read = "/".join(f"{b / 2**20:.1f}" for b in r["bytes_read_at_load"])
            lines.append(f"{r['engine']} tp={r['tp']} load: MiB read per rank {read} of the "
                         f"checkpoint's {r['checkpoint_bytes'] / 2**20:.1f} MiB")
    for q in result["ratios"]:
        lines.append(f"{q.get('engine', 'shardlm')} tp={q['tp']} / {q.get('baseline', 'transformers')} at {q['threads']} "
                     f"thread(s), concurrency {q['concurrency']}"
                     + (f", rate {q['request_rate']}/s" if q.get("request_rate") else "")
                     + f": {q['ratio']:.2f}x output tok/s; median TTFT "
                     f"{q['ttft_p50_s'][0] * 1e3:.0f} vs {q['ttft_p50_s'][1] * 1e3:.0f} ms, median "
                     f"TPOT {q['tpot_p50_s'][0] * 1e3:.1f} vs {q['tpot_p50_s'][1] * 1e3:.1f} ms")
    roof = [r for r in result["shardlm"] if "roofline" in r]
    if roof:
        batches = sorted({int(r["roofline"].get("decode_batch", 32)) for r in roof})
        columns = [(name.replace("bN", f"b{batches[0]}") if len(batches) == 1 else name, width)
                   for name, width in ROOF_COLUMNS]
        lines += ["", _row(columns)]
        for r in roof:
            f = r["roofline"]
            cells = [f"tp={r['tp']}" + (f" {r['precision']}" if r.get("precision") else ""), f["prefill_tokens"], f"{f['prefill_s']:.3f}",
                     f"{f['prefill_flops_per_s'] / 1e9:.1f}", f"{f['prefill_fraction_of_matmul']:.1%}",
                     f"{(f['decode_b1_step_s'] or 0) * 1e3:.1f}",
                     f"{f.get('decode_b1_bytes_per_s', 0) / 1e9:.2f}",
                     f"{f.get('decode_b1_fraction_of_read_bw', 0):.1%}",
                     f"{(f['decode_batch_step_s'] or 0) * 1e3:.1f}",
                     f"{f.get('decode_batch_tokens_per_s', 0):.1f}"]
            lines.append(_row(list(zip(cells, [w for _, w in ROOF_COLUMNS]))))
        rounds = len(roof[0]["roofline"].get("rounds", [])) or 1
        lines.append(f"(medians of {rounds} probe round(s), each against the ceilings measured "
                     f"in the same round)")
    for q in result.get("tp_scaling", []):
        each = ", ".join(f"{v:.2f}" for v in q["rounds"])
        lines.append(f"decode step at batch {q['decode_batch']}, tp={q['tp']} / tp={q['vs_tp']}: "
                     f"{q['decode_batch_step_ratio']:.2f}x (median; rounds {each})")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Throughput, TTFT and TPOT percentiles against concurrency (offline, shardlm beside the
    baseline) or against the request rate (online)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(f"{r['engine']} tp={r['tp']}", r) for r in result["shardlm"]]
    series += [(f"{r['engine']} {r['threads']} thr", r) for r in result["baseline"]]
    online = any(r.get("mode") == "online" for _, r in series)
    rates = result["workload"].get("request_rate") or []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (name, r) in enumerate(series):
        color, points = f"C{i}", r["points"]
        if r.get("mode") == "online":  # request rates, evenly spaced ("inf" last)
            x = [rates.index(p["request_rate"]) for p in points]
        else:
            x = [p["concurrency"] for p in points]
        if online and r.get("mode") != "online":
            continue  # one x axis per plot: request rate when online
        axes[0].plot(x, [p["output_tokens_per_s"] for p in points], "o-", color=color, label=name)
        for ax, key in ((axes[1], "ttft_s"), (axes[2], "tpot_s")):
            for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
                ax.plot(x, [p[key][q] * 1e3 if p[key] else float("nan") for p in points],
                        style, color=color, label=f"{name} {q}")
    titles = ("output tokens/s", "TTFT ms (p50 - / p90 -- / p99 :)", "TPOT ms (p50 - / p90 -- / p99 :)")
    for ax, title in zip(axes, titles):
        if online:
            ax.set_xticks(range(len(rates)), [f"{r}/s" for r in rates])
            ax.set_xlabel("request rate (Poisson arrivals, over HTTP)")
        else:
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

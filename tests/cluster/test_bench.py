"""`shardlm bench` on a random tiny checkpoint (token ids only): every figure is present,
positive and consistent with the others. No timing thresholds (DESIGN.md: performance is
measured by benchmarks that print figures, never asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cluster.bench import BenchOptions, run
from cluster.bench_report import format_report, plot
from tests.checkpoints import write_tiny_checkpoint

REQUESTS, OUTPUT_LEN, CONCURRENCY = 4, 8, [2, 4]


@pytest.fixture(scope="module")
def result(ray_session, tmp_path_factory):
    tiny = write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("bench-tiny"), seed=3)
    opts = BenchOptions(model=str(tiny), tp=[1], num_requests=REQUESTS, prompt_len=(3, 20),
                        output_len=OUTPUT_LEN, seed=7, concurrency=CONCURRENCY,
                        baseline="transformers", baseline_batch_size=2, quiet=True,
                        threads_per_worker=1,
                        overrides={"cpus_per_worker": 0.5, "block_size": 4,
                                   "kv_cache_bytes": 1 << 22})
    return run(opts)


def _check_point(p: dict, concurrency: int) -> None:
    assert p["concurrency"] == concurrency and p["requests"] == REQUESTS
    assert p["output_tokens"] == REQUESTS * OUTPUT_LEN
    assert p["wall_s"] > 0
    assert p["output_tokens_per_s"] == pytest.approx(p["output_tokens"] / p["wall_s"], rel=1e-9)
    assert p["requests_per_s"] == pytest.approx(REQUESTS / p["wall_s"], rel=1e-9)
    for key in ("ttft_s", "tpot_s", "latency_s"):
        q = p[key]
        assert 0 < q["p50"] <= q["p90"] <= q["p99"], (key, q)
    assert p["ttft_s"]["p99"] <= p["latency_s"]["p99"]
    assert p["latency_s"]["p99"] <= p["wall_s"] * (1 + 1e-9)


def test_workload_is_fixed(result):
    w = result["workload"]
    assert w["num_requests"] == REQUESTS and w["output_len"] == OUTPUT_LEN
    assert w["prompt_len"] == [3, 20] and 3 * REQUESTS <= w["prompt_tokens"] <= 20 * REQUESTS
    assert w["vocab_size"] == 151 and w["concurrency"] == CONCURRENCY


def test_shardlm_figures(result):
    (run_,) = result["shardlm"]
    assert run_["tp"] == 1 and run_["threads"] == 1 and run_["num_kv_blocks"] > 0
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
        (name,) = p["worker_peak_rss_bytes"]
        assert name.startswith("bench-") and name.endswith("-tp1-worker-0-0")
        assert all(v > 0 for v in p["worker_peak_rss_bytes"].values())
        for name, peak in p["worker_vmhwm_bytes"].items():  # lifetime peak >= a sampled RSS
            assert peak >= p["worker_peak_rss_bytes"][name] * 0.99


def test_roofline_and_ceilings(result):
    ceilings = result["machine"]["ceilings"]["1"]
    assert ceilings["matmul_flops"] > 0 and ceilings["read_bytes_per_s"] > 0
    assert ceilings["copy_bytes_per_s"] > 0
    params = result["model"]["params"]
    assert Path(result["model"]["name"]).resolve() == Path(result["model"]["dir"]).resolve()
    assert params["total"] > params["blocks"] > 0 and params["lm_head"] == 151 * 72
    roof = result["shardlm"][0]["roofline"]
    assert roof["prefill_tokens"] == 20 and roof["prefill_s"] > 0
    assert roof["prefill_flops"] == 2 * params["blocks"] * 20 + 2 * params["lm_head"]
    assert roof["prefill_flops_per_s"] == pytest.approx(roof["prefill_flops"] / roof["prefill_s"])
    assert roof["decode_weight_bytes_per_token"] == 4 * (params["blocks"] + params["lm_head"])
    assert roof["decode_b1_step_s"] > 0 and roof["decode_batch_step_s"] > 0
    assert roof["decode_batch"] == 32
    assert roof["decode_b1_fraction_of_read_bw"] > 0 and roof["prefill_fraction_of_matmul"] > 0


def test_baseline_and_ratio(result):
    (base,) = result["baseline"]
    assert base["engine"] == "transformers" and base["threads"] == 1
    for p, c in zip(base["points"], CONCURRENCY):
        _check_point(p, c)
        assert p["batch_size"] == 2
        assert 0 <= p["identical_to_shardlm"] <= REQUESTS
    ratios = result["ratios"]
    assert [r["concurrency"] for r in ratios] == CONCURRENCY
    for r, mine, theirs in zip(ratios, result["shardlm"][0]["points"], base["points"]):
        assert r["ratio"] == pytest.approx(mine["output_tokens_per_s"] / theirs["output_tokens_per_s"])


def test_report_json_and_plot(result, tmp_path):
    table = format_report(result)
    assert "shardlm" in table and "transformers" in table and "roofline" in table
    assert json.loads(json.dumps(result)) == result  # --json writes exactly this
    pytest.importorskip("matplotlib")
    plot(result, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").stat().st_size > 1000


# ---- online mode: the same workload over real HTTP (Ray Serve + the engine service) --------
RATES = [math.inf, 50.0]


@pytest.fixture(scope="module")
def online(ray_session, tmp_path_factory):
    tiny = write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("bench-online"), seed=3)
    opts = BenchOptions(model=str(tiny), tp=[1], num_requests=REQUESTS, prompt_len=(3, 20),
                        output_len=OUTPUT_LEN, seed=7, mode="online", request_rate=RATES,
                        concurrency=[3], quiet=True, threads_per_worker=1,
                        overrides={"cpus_per_worker": 0.5, "block_size": 4,
                                   "kv_cache_bytes": 1 << 22})
    return run(opts)


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
    assert online["ratios"] == [] and online["baseline"] == []


def test_online_arrivals_are_poisson():
    from cluster.bench_online import arrival_gaps

    assert arrival_gaps(5, math.inf, 0) == [0.0] * 5
    gaps = arrival_gaps(20000, 4.0, 0)
    assert gaps == arrival_gaps(20000, 4.0, 0)  # seeded
    mean = sum(gaps) / len(gaps)
    var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    assert mean == pytest.approx(0.25, rel=0.03) and var == pytest.approx(0.0625, rel=0.06)


def test_online_report_and_plot(online, tmp_path):
    table = format_report(online)
    assert "shardlm http inf/s" in table and "shardlm http 50.0/s" in table
    assert json.loads(json.dumps(online)) == online
    plot(online, str(tmp_path / "online.png"))
    assert (tmp_path / "online.png").stat().st_size > 1000


def test_command_line_rejects_bad_values_by_name():
    import argparse

    from cluster.bench import add_arguments

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    args = parser.parse_args(["--request-rate", "0.5,inf", "--threads-per-worker", "2"])
    assert args.request_rate == [0.5, math.inf] and args.threads_per_worker == 2
    for flag, value, message in [("--request-rate", "nan", "positive request rates"),
                                 ("--request-rate", "0", "positive request rates"),
                                 ("--threads-per-worker", "0", "positive integer or 'auto'"),
                                 ("--prompt-len", "9-3", "1 <= MIN <= MAX"),
                                 ("--mode", "batch", "invalid choice")]:
        with pytest.raises(argparse.ArgumentError, match=message):
            parser.parse_args([flag, value])

"""`shardlm bench` on a random tiny checkpoint (token ids only): every figure is present,
positive and consistent with the others. No timing thresholds (DESIGN.md: performance is
measured by benchmarks that print figures, never asserted)."""

from __future__ import annotations

import json
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

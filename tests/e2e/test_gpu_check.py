"""`make gpu-check` where no GPU is: it says so and exits 0; and its dry run on the CPU
(`--device cpu`), every check through the CUDA path's triton kernels and padded CUDA-graph
buffers in triton's interpreter, against transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "cluster.tools.gpu_check", "--out", str(out),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    return proc, json.loads(out.read_text())


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    proc, report = _run(tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device here" in proc.stdout
    assert report["cuda"] is False


def test_dry_run_on_the_cpu_passes_through_the_cuda_kernels(tmp_path):
    proc, report = _run("--device", "cpu", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = {c["check"]: c for c in report["checks"]}
    assert report["passed"] and report["failed"] == []
    assert set(checks) >= {"fp32 greedy parity", "16-bit argmax agreement", "chunked prefill",
                           "prefix cache", "preemption", "mixed prefill/decode",
                           "seeded sampling", "cuda graphs on = off", "speculative decoding",
                           "deterministic 16-bit", "throughput vs transformers"}
    engine_checks = [c for c in checks.values() if "ops" in c]
    assert engine_checks and all(c["ops"] == "cuda-triton" for c in engine_checks)
    assert checks["cuda graphs on = off"]["cuda_graphs"]  # the padded decode buffers ran
    assert checks["preemption"]["preemptions"] > 0
    assert checks["mixed prefill/decode"]["mixed_steps"] > 0
    assert checks["deterministic 16-bit"]["differing"] == []
    assert checks["speculative decoding"]["kept"] > 0
    assert "gpu-check: 11 passed, 0 failed" in proc.stdout

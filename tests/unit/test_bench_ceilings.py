"""``shardlm bench``'s machine ceilings: the bf16 matmul is timed only where the CPU multiplies
bf16 itself (``avx512_bf16`` or ``amx_bf16`` among the flags the kernels see); elsewhere torch
emulates it, orders of magnitude slower, and the report says why the figure is missing.
``SHARDLM_CPU_ISA=avx2`` stands for a CPU with AVX2 alone (``layers.cpu.flags``)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cluster.bench.baseline import NOTED_FLAGS, cpu_description, machine_ceilings
from cluster.bench.probes import summarize_rounds
from cluster.bench.report import format_report
from layers.cpu.flags import BF16_DOT_FLAGS, cpu_flags

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "dot", "mv"}


class MatmulRecorder(TorchDispatchMode):
    """The dtypes of the tensor arguments of every matmul-like aten op run under it."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.seen.append((func.overloadpacket.__name__,
                              {a.dtype for a in args if isinstance(a, torch.Tensor)}))
        return func(*args, **(kwargs or {}))


def _set_isa(monkeypatch, isa: str) -> None:
    if isa == "native":
        monkeypatch.delenv("SHARDLM_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("SHARDLM_CPU_ISA", isa)


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_bf16_matmul_is_timed_only_with_bf16_dot_products(monkeypatch, isa):
    """Under avx2 no CPU has bf16 dot products: not one bf16 matmul runs and the ceilings have
    no bf16 figure, only the reason. Natively, the bf16 matmul runs exactly where the CPU has
    them (this machine's flags decide which case is checked). Either way the recorder sees the
    fp32 matmul, so it is not blind to the probe's products."""
    _set_isa(monkeypatch, isa)
    expected = bool(cpu_flags() & BF16_DOT_FLAGS)
    if isa == "avx2":
        assert not expected  # the flags past AVX2 are masked
    recorder = MatmulRecorder()
    with recorder:
        ceilings = machine_ceilings(1, n=256, stream_bytes=1 << 20)
    dtypes = [d for _, d in recorder.seen]
    assert any(d == {torch.float32} for d in dtypes), recorder.seen
    ran_bf16 = any(torch.bfloat16 in d for d in dtypes)
    assert ran_bf16 == expected, recorder.seen
    assert ceilings["matmul_flops"] > 0 and ceilings["read_bytes_per_s"] > 0
    if expected:
        assert ceilings["matmul_bf16_flops"] > 0 and "matmul_bf16" not in ceilings
    else:
        assert "matmul_bf16_flops" not in ceilings
        assert ceilings["matmul_bf16"].startswith("not measured: no bf16 dot products")
        assert ("kernels built for avx2" in ceilings["matmul_bf16"]) == (isa == "avx2")


def test_report_without_a_bf16_ceiling(monkeypatch):
    """The ceilings of a CPU without bf16 dot products go through the rounds' medians and a
    bf16 run's roofline (against the fp32 matmul) to a report that says "n/a" and why; the
    cpu line gives the flags as the kernels see them and the ISA they are built for."""
    monkeypatch.setenv("SHARDLM_CPU_ISA", "avx2")
    rounds = [{"1": machine_ceilings(1, n=256, stream_bytes=1 << 20)} for _ in range(2)]
    probe = {"prefill_tokens": 20, "prefill_s": 0.01, "decode_b1_step_s": 0.002,
             "decode_batch": 32, "decode_batch_step_s": 0.004}
    run = {"engine": "shardlm", "tp": 1, "threads": 1, "dtype": "bfloat16", "points": [],
           "probe_rounds": [(probe, r["1"]) for r in rounds]}
    counts = {"blocks": 1000, "lm_head": 100, "total": 1200}
    ceilings = summarize_rounds([run], rounds, counts)
    assert "matmul_bf16_flops" not in ceilings["1"]
    roof = run["roofline"]["rounds"][0]
    assert roof["prefill_fraction_of_matmul"] == pytest.approx(
        roof["prefill_flops_per_s"] / rounds[0]["1"]["matmul_flops"])

    cpu = cpu_description()
    assert not any(f.startswith(("avx512", "amx")) for f in cpu["flags"])
    assert cpu["flags"] == [f for f in NOTED_FLAGS if f in cpu_flags()]
    if {"avx2", "fma"} <= cpu_flags():
        assert cpu["kernel_isa"] == "avx2"
    else:  # a CPU the avx2 kernels cannot run on: the report says so
        assert "SHARDLM_CPU_ISA=avx2" in cpu["kernel_isa"]
    result = {"workload": {"num_requests": 0, "prompt_len": [1, 1], "prompt_tokens": 0,
                           "prompts": "none", "seed": 0, "output_len": 1},
              "model": {"dir": "/nowhere", "params": counts},
              "machine": {"cpus": 1, "cpu": cpu, "load_average_start": [0.0],
                          "load_average_end": [0.0], "ceilings": ceilings},
              "shardlm": [run], "baseline": [], "ratios": []}
    table = format_report(result).splitlines()
    cpu_line = next(line for line in table if line.startswith("cpu: "))
    assert cpu_line.endswith(f"(kernels built for {cpu['kernel_isa']})")
    row = next(line for line in table if line.split()[:1] == ["1"])
    assert row.split()[2] == "n/a"
    (why,) = [line for line in table if line.startswith("bf16 GFLOP/s n/a: ")]
    assert ceilings["1"]["matmul_bf16"] in why and "kernels built for avx2" in why


def test_report_with_a_bf16_ceiling():
    """Where it was measured the bf16 column has the figure and no line explains its absence;
    a JSON from before ``kernel_isa`` still reports."""
    c = {"threads": 1, "matmul_flops": 2e9, "matmul_bf16_flops": 3e9, "read_bytes_per_s": 4e9,
         "copy_bytes_per_s": 5e9}
    result = {"workload": {"num_requests": 0, "prompt_len": [1, 1], "prompt_tokens": 0,
                           "prompts": "none", "seed": 0, "output_len": 1},
              "model": {"dir": "/nowhere", "params": {"total": 1}},
              "machine": {"cpus": 1, "cpu": {"model": "x", "flags": ["avx2"]},
                          "load_average_start": [0.0], "load_average_end": [0.0],
                          "ceilings": {"1": c}},
              "shardlm": [], "baseline": [], "ratios": []}
    table = format_report(result)
    assert "cpu: x; flags: avx2\n" in table + "\n" and "n/a" not in table
    row = next(line for line in table.splitlines() if line.split()[:1] == ["1"])
    assert row.split()[1:5] == ["2.0", "3.0", "4.0", "5.0"]

"""Deterministic mode (docs/ARCHITECTURE.md, "Deterministic mode"): a sequence's
logits are the same bit for bit whatever else its steps hold, however its prompt was
chunked, whether its prefix came from the prefix cache, and when a replay (a worker's or
the engine's death, a preemption) recomputes its generated tokens as a prompt into other
blocks.

One target sequence (a prompt, then tokens decoded one by one) is run alone; every other
way of computing it must give ``torch.equal`` logits at every position both computed. Each
format (float32, bfloat16, int8) and each family's path (dense, Gemma 2's windows and soft
caps, Mixture-of-Experts routing) is checked; with deterministic mode off the same
comparisons fail (``test_the_default_kernels_are_not_batch_invariant``), which is what
shows these tests can fail.

The CUDA platform's triton kernels (``triton-bfloat16``) run here in triton's interpreter on
CPU tensors (conftest sets ``TRITON_INTERPRET=1``), as the other CUDA kernels are checked;
``make gpu-check`` runs a comparison through the engine compiled on a GPU (and, in its dry
run, here in float16)."""

from __future__ import annotations

import itertools

import pytest
import torch

from cluster.contract.messages import SeqChunk, StepPlan
from layers.cpu.ops import CpuOps, kernels_available
from layers.models import build_model
from layers.platform import use_ops
from workers import kv_cache
from workers.comm import TrivialCommunicator
from workers.model_runner import prepare, run_stage

needs_cpu_kernels = pytest.mark.skipif(not kernels_available(),
                                       reason="the CPU kernels did not build")

BLOCK = 4  # the CPU kernels' test block; the triton kernels take 16 at least
TRITON_BLOCK = 16
BLOCKS = 1200
# a vocabulary of 250: the LM head's outputs fill no whole panel, so its kernels take it on
# copies padded with zero outputs
BASE = dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=256)
FAMILIES = {
    "dense": dict(BASE, architectures=["LlamaForCausalLM"]),
    "gemma2": dict(BASE, architectures=["Gemma2ForCausalLM"], sliding_window=8,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh"),
    "moe": dict(BASE, architectures=["MixtralForCausalLM"], num_local_experts=4,
                num_experts_per_tok=2),
}
FORMATS = ("float32", "bfloat16", "int8")
# the triton kernels: every family in bfloat16 (what GPUs run); float16 through the engine in
# `make gpu-check`'s dry run (tests/e2e/test_gpu_check.py: alone against among others, chunked,
# from the prefix cache)
TRITON_CASES = [(family, "triton-bfloat16") for family in FAMILIES]

PROMPT = [int(t) for t in torch.randint(0, 250, (23,), generator=torch.Generator().manual_seed(1))]
GENERATED = [int(t) for t in torch.randint(0, 250, (9,), generator=torch.Generator().manual_seed(2))]
TOKENS = PROMPT + GENERATED


class Model:
    """A tiny model on the CPU kernels (``fmt`` a weight format) or on the triton kernels
    (``triton-<dtype>``) with a paged cache, run a step at a time in process; its block
    numbers handed out in order (each sequence its own, unless shared)."""

    def __init__(self, family: str, fmt: str, deterministic: bool = True):
        torch.manual_seed(0)
        triton_dtype = fmt.removeprefix("triton-") if fmt.startswith("triton-") else None
        dtype = getattr(torch, triton_dtype) if triton_dtype else torch.float32
        config = FAMILIES[family]
        if triton_dtype:  # one KV head, and one layer where the family has no second kind
            # of layer: fewer programs for the interpreter to run
            config = dict(config, num_key_value_heads=1,
                          num_hidden_layers=2 if family == "gemma2" else 1)
        self.model = build_model(config, TrivialCommunicator(), dtype)
        for name, param in self.model.named_parameters():
            if "norm" in name:
                param.data.normal_(1.0 if family != "gemma2" else 0.0, 0.1)
            else:
                param.data.normal_(0, 0.2)
        if triton_dtype:
            from layers.cuda.ops import CudaOps

            ops, kv, self.block = CudaOps(deterministic), dtype, TRITON_BLOCK
        else:
            kv = torch.bfloat16 if fmt == "bfloat16" else torch.float32
            ops = CpuOps(weights=fmt, kv_cache_dtype=kv, deterministic=deterministic)
            self.block = BLOCK
        use_ops(self.model, ops)
        kv_cache.allocate(self.model, BLOCKS, self.block, kv, torch.device("cpu"))
        self.next_block = itertools.count(1)
        self.tables: dict[int, list[int]] = {}
        self.steps = itertools.count(1)

    def table(self, seq: int, length: int, shared: list[int] = ()) -> list[int]:
        table = self.tables.setdefault(seq, list(shared))
        while len(table) * self.block < length:
            table.append(next(self.next_block))
        return table

    @torch.inference_mode()
    def step(self, chunks: list[tuple[int, list[int], int]]) -> dict[tuple[int, int], torch.Tensor]:
        """Run one step of (sequence, new tokens, position of the first); the logits of
        every new token, keyed by (sequence, position)."""
        plan = StepPlan(next(self.steps), [
            SeqChunk(seq, ids, start, list(self.table(seq, start + len(ids))), True)
            for seq, ids, start in chunks])
        batch = prepare(plan, self.block, torch.device("cpu"))
        hidden = run_stage(self.model, None, batch.input_ids, batch.positions, batch.attn)
        logits = self.model.compute_logits(hidden)
        out, row = {}, 0
        for seq, ids, start in chunks:
            for j in range(len(ids)):
                out[(seq, start + j)] = logits[row]
                row += 1
        return out


TARGET = 0


def alone(m: Model) -> dict[int, torch.Tensor]:
    """The target's prompt in one step, then each generated token in a step of its own."""
    found = m.step([(TARGET, PROMPT, 0)])
    for i, tok in enumerate(GENERATED):
        found.update(m.step([(TARGET, [tok], len(PROMPT) + i)]))
    return {pos: x for (seq, pos), x in found.items() if seq == TARGET}


def others(n: int, first: int, length: int) -> list[tuple[int, list[int], int]]:
    gen = torch.Generator().manual_seed(first)
    return [(first + i, [int(t) for t in torch.randint(0, 250, (length,), generator=gen)], 0)
            for i in range(n)]


def in_company(m: Model) -> dict[int, torch.Tensor]:
    """The same tokens among 1 to 63 other sequences: its prompt beside three other prompts,
    its decode steps beside other prompts' chunks (mixed steps) and beside 7, 15, 31 and 63
    decoding sequences."""
    found = m.step([*others(3, 100, 11), (TARGET, PROMPT, 0)])
    decoding = others(63, 200, 5)
    m.step(decoding)  # their prompts; they decode from here on
    pos = len(PROMPT)
    for i, tok in enumerate(GENERATED):
        company = [(seq, [7 + i], len(ids) + i) for seq, ids, _ in decoding]
        k = (1, 7, 15, 31, 63, 2, 40, 5, 63)[i]
        chunk = others(1, 300 + i, 6 + i) if i % 3 == 0 else []
        found.update(m.step([*company[:k // 2], (TARGET, [tok], pos + i), *chunk,
                             *company[k // 2:k]]))
    return {pos: x for (seq, pos), x in found.items() if seq == TARGET}


def chunked(m: Model) -> dict[int, torch.Tensor]:
    """The prompt in chunks of 5, 1, 7 and 10 tokens (a token budget), then the generated
    tokens in two chunks, as a continued prompt."""
    found = {}
    for start, end in ((0, 5), (5, 6), (6, 13), (13, 23), (23, 27), (27, 32)):
        found.update(m.step([(TARGET, TOKENS[start:end], start), *others(2, 400 + start, 3)]))
    return {pos: x for (seq, pos), x in found.items() if seq == TARGET}


def replayed(m: Model) -> dict[int, torch.Tensor]:
    """After a failure (or a preemption by recompute): the prompt and the generated tokens as
    one prompt, into other blocks than a first run's, beside another request's replay."""
    m.step(others(5, 500, 30))  # a first run's blocks and some company
    found = m.step([*others(1, 600, 17), (TARGET, TOKENS, 0)])
    return {pos: x for (seq, pos), x in found.items() if seq == TARGET}


def prefix_cached(m: Model) -> dict[int, torch.Tensor]:
    """The target's first 16 tokens (whole blocks) computed by another sequence, then the
    target from position 16 on reading those blocks (a prefix-cache hit), decoding after."""
    m.step([(TARGET + 1, PROMPT[:16], 0)])
    shared = m.tables[TARGET + 1][:16 // m.block]
    m.table(TARGET, 16, shared)
    found = m.step([(TARGET, PROMPT[16:], 16), *others(2, 700, 9)])
    for i, tok in enumerate(GENERATED):
        found.update(m.step([(TARGET, [tok], len(PROMPT) + i)]))
    return {pos: x for (seq, pos), x in found.items() if seq == TARGET}


WAYS = {"in_company": in_company, "chunked": chunked, "replayed": replayed,
        "prefix_cached": prefix_cached}


def differing(ref: dict, got: dict) -> list[int]:
    common = sorted(set(ref) & set(got))
    assert common, "no position computed both ways"
    return [pos for pos in common if not torch.equal(ref[pos], got[pos])]


@pytest.mark.parametrize("family,fmt", [
    *(pytest.param(family, fmt, marks=needs_cpu_kernels) for fmt in FORMATS for family in FAMILIES),
    *TRITON_CASES])
def test_logits_are_the_same_bits_however_the_sequence_is_computed(family, fmt):
    ref = alone(Model(family, fmt))
    assert set(ref) == set(range(len(TOKENS)))
    for name, way in WAYS.items():
        got = way(Model(family, fmt))
        assert not differing(ref, got), f"{name}: logits differ at positions {differing(ref, got)}"


@needs_cpu_kernels
@pytest.mark.parametrize("fmt", ("float32", "bfloat16"))
def test_the_default_kernels_are_not_batch_invariant(fmt):
    """The same comparisons with deterministic mode off: rows computed in company, or a
    prompt's tokens against decoded ones, do differ (so the test above can fail)."""
    ref = alone(Model("dense", fmt, deterministic=False))
    diffs = {name: differing(ref, way(Model("dense", fmt, deterministic=False)))
             for name, way in WAYS.items()}
    assert any(diffs.values()), diffs


def test_a_triton_matmul_split_by_the_row_count_is_caught(monkeypatch):
    """What cuBLAS does (split-K chosen by the matrix's shape), done to the triton matmul:
    steps of fewer than 8 rows sum each half of K on its own and add the halves. The
    comparisons above see it, so they can fail on the triton path too. (torch's CPU kernels,
    which the triton path's default mode runs here, happen to be batch-invariant at these
    sizes; cuBLAS on a GPU is not, which ``make gpu-check`` shows.)"""
    from layers.cuda import invariant

    matmul = invariant.matmul

    def split_k_for_few_rows(x, weight, bias=None, out_dtype=None):
        if x.numel() // x.shape[-1] >= 8:
            return matmul(x, weight, bias, out_dtype)
        half = x.shape[-1] // 2
        y = (matmul(x[..., :half], weight[:, :half], None, torch.float32)
             + matmul(x[..., half:], weight[:, half:], bias, torch.float32))
        return y.to(out_dtype or x.dtype)

    monkeypatch.setattr(invariant, "matmul", split_k_for_few_rows)
    ref = alone(Model("dense", "triton-bfloat16"))
    assert differing(ref, replayed(Model("dense", "triton-bfloat16")))


@needs_cpu_kernels
def test_deterministic_mode_is_refused_where_it_cannot_be_honoured(monkeypatch):
    """Refused at start with a message naming the part, never silently not deterministic:
    torch's own kernels (SHARDLM_OPS=torch, on a CPU or a GPU), heads the CPU attention
    kernel does not take, KV blocks the triton attention kernel does not take."""
    from layers.cuda.ops import CudaOps
    from layers.platform import select_ops

    monkeypatch.setenv("SHARDLM_OPS", "torch")
    with pytest.raises(ValueError, match="model.deterministic: the torch platform"):
        select_ops("cpu", torch.float32, deterministic=True)
    with pytest.raises(ValueError, match=r"model.deterministic: the torch platform \(cuda, bfloat16\)"):
        select_ops("cuda", torch.bfloat16, deterministic=True)
    monkeypatch.delenv("SHARDLM_OPS")
    assert select_ops("cpu", torch.bfloat16, deterministic=True).deterministic
    assert isinstance(ops := select_ops("cuda", torch.bfloat16, deterministic=True), CudaOps)
    assert ops.deterministic
    odd = dict(FAMILIES["dense"], head_dim=8)
    model = build_model(odd, TrivialCommunicator(), torch.float32)
    with pytest.raises(ValueError, match="layers.0.self_attn.attn has 4 query heads, 2 KV heads of 8"):
        use_ops(model, CpuOps(weights="bfloat16", deterministic=True))
    model = build_model(FAMILIES["dense"], TrivialCommunicator(), torch.bfloat16)
    use_ops(model, CudaOps(deterministic=True))
    with pytest.raises(ValueError, match=r"blocks of a power of two >= 16 tokens, not 8 \(cache.block_size\)"):
        kv_cache.allocate(model, 4, 8, torch.bfloat16, torch.device("cpu"))
    use_ops(model, CudaOps())  # not deterministic: torch's attention takes such blocks
    assert kv_cache.allocate(model, 4, 8, torch.bfloat16, torch.device("cpu")) > 0


@needs_cpu_kernels
def test_the_cost_bench_times_both_modes_side_by_side(tmp_path, capsys):
    """``shardlm bench --determinism-cost``'s tool on a tiny checkpoint: a row per format and
    step, both modes timed, the ratio theirs; the CPU's flags printed first."""
    from cluster.tools import determinism_bench
    from tests.checkpoints import write_tiny_checkpoint

    tiny = write_tiny_checkpoint("llama-gqa", tmp_path, hidden_size=144,
                                 intermediate_size=128)
    rows = determinism_bench.run(tiny, ["float32", "int8"], context=20, prompt=256, rounds=1)
    steps = ["decode b1", "decode b16", "decode b64", "prompt 1x256"]
    assert [(r["format"], r["step"]) for r in rows] == [(f, s) for f in ("float32", "int8") for s in steps]
    for r in rows:
        assert r["default_ms"] > 0 and r["deterministic_ms"] > 0
        assert r["ratio"] == pytest.approx(r["deterministic_ms"] / r["default_ms"])
    capsys.readouterr()
    assert determinism_bench.main(["--model", str(tiny), "--formats", "float32", "--rounds", "1",
                                   "--context", "8", "--prompt", "256"]) == 0
    assert capsys.readouterr().out.startswith("CPU flags: ")

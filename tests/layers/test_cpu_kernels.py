"""The C kernels against torch: paged decode attention against scaled_dot_product_attention
on keys and values gathered by plain indexing (and the PyTorch fallback path against the same
reference), the packed linear against a plain matmul. Shapes cover GQA ratios 1, 3 and 8, contexts of one token, a block boundary and
one past it, and block tables in scrambled order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.attention import Attention, AttnBatch
from layers.cpu import decode_layer as cpu_decode_layer
from layers.cpu import kernels as cpu_kernels
from layers.cpu.flags import BF16_DOT_FLAGS, avx2_is_forcible, cpu_flags
from layers.cpu.ops import CpuOps
from layers.cpu.weights import quantize_int8
from layers.ops import NATIVE
from layers.platform import select_ops, use_ops

# The kernels pick their code by the instruction set they are compiled for. Tests of kernels
# with code of their own per instruction set run each build this CPU can run: its own
# (native) and, on an x86 CPU with AVX-512, the AVX2-only build (SHARDLM_CPU_ISA=avx2, which
# also hides the flags past AVX2), so that a machine with AVX-512 still tests what an AVX2
# machine runs.
ISAS = ["native", "avx2"] if avx2_is_forcible() else ["native"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    with monkeypatch.context() as env:
        env.setenv("SHARDLM_CPU_ISA", request.param)
        cpu_kernels.reselect()
        yield request.param
    cpu_kernels.reselect()


def test_avx2_build_is_the_avx2_machines(monkeypatch):
    """Under SHARDLM_CPU_ISA=avx2 the kernels are another library with no flag past AVX2 in
    sight (dtype auto and the GEMM choices follow), and a name the build does not know is a
    clear error."""
    native = cpu_kernels.load()
    if not avx2_is_forcible():  # an AVX2-only CPU (or another architecture): nothing to force
        assert not {"avx2", "avx512f"} <= cpu_flags()
        return
    try:
        monkeypatch.setenv("SHARDLM_CPU_ISA", "avx2")
        avx2 = cpu_kernels.reselect()
        assert avx2 is not None and avx2 is not native and "-avx2-" in avx2._name
        assert cpu_kernels.load() is avx2
        assert {"avx2", "fma"} <= cpu_flags() and not {f for f in cpu_flags() if f.startswith(("avx512", "amx"))}
        assert not avx2.amx_linear_available()
        monkeypatch.setenv("SHARDLM_CPU_ISA", "sse9")
        with pytest.raises(ValueError, match="SHARDLM_CPU_ISA='sse9'"):
            cpu_kernels.reselect()
    finally:
        monkeypatch.delenv("SHARDLM_CPU_ISA")
        cpu_kernels.reselect()


# num_q, num_kv, head_dim, block_size (groups of 3, 1, 8, 6 and 16 query heads per KV head)
SHAPES = [(9, 3, 64, 16), (4, 4, 32, 4), (8, 1, 128, 8), (12, 2, 48, 16), (16, 1, 64, 16)]


def _case(num_q, num_kv, hd, bs, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks, lens = 64, [1, 5, bs, bs + 1, 3 * bs - 1, 40, 17]
    cache = torch.randn(2, num_blocks, bs, num_kv, hd, generator=g)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:16] for _ in lens])
    q = torch.randn(len(lens), num_q, hd, generator=g)
    return q, cache, tables, lens


def _reference(q, cache, tables, lens, scale):
    """Gather each sequence's tokens by position, then torch's SDPA, one sequence at a time."""
    _, _, bs, _, _ = cache.shape
    outs = []
    for i, n in enumerate(lens):
        pos = torch.arange(n)
        blocks = tables[i][pos // bs]
        k, v = cache[0, blocks, pos % bs], cache[1, blocks, pos % bs]  # (n, num_kv, hd)
        out = F.scaled_dot_product_attention(q[i][None, :, None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], scale=scale, enable_gqa=True)
        outs.append(out[0, :, 0])
    return torch.stack(outs)  # (seqs, num_q, hd)


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_torch_attention(shape, isa):
    q, cache, tables, lens = _case(*shape)
    scale = shape[2] ** -0.5
    got = cpu_kernels.paged_decode_attention(q, cache, tables, torch.tensor(lens), scale)
    assert got is not None, "the kernel did not build on this machine (a C compiler is required)"
    torch.testing.assert_close(got, _reference(q, cache, tables, lens, scale), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_reads_a_bf16_cache(shape, isa):
    """A bf16 cache: the same attention as torch's over the cache's bf16 values widened."""
    q, cache, tables, lens = _case(*shape)
    cache = cache.to(torch.bfloat16)
    scale = shape[2] ** -0.5
    got = cpu_kernels.paged_decode_attention(q, cache, tables, torch.tensor(lens), scale)
    assert got is not None
    torch.testing.assert_close(got, _reference(q, cache.float(), tables, lens, scale),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_attention_module_paths_agree(shape, monkeypatch):
    """The attention module's decode through the CPU path (kernel) and through the
    device-generic path, the platform each chooses with the kernels on and off."""
    q, cache, tables, lens = _case(*shape, seed=1)
    attn = Attention(shape[0], shape[1], shape[2])
    attn.kv_cache = cache
    expected = _reference(q, cache, tables, lens, attn.scale)
    batch = lambda: AttnBatch([1] * len(lens), [n - 1 for n in lens], tables)
    attn.ops = select_ops("cpu", torch.float32)
    assert isinstance(attn.ops, CpuOps)
    torch.testing.assert_close(attn.ops.paged_decode(q, cache, batch(), attn.scale), expected,
                               atol=2e-6, rtol=1e-5)
    monkeypatch.setenv("SHARDLM_CPU_KERNELS", "0")
    cpu_kernels.reselect()
    try:
        assert cpu_kernels.paged_decode_attention(q, cache, tables, torch.tensor(lens), 1.0) is None
        attn.ops = select_ops("cpu", torch.float32)
        assert attn.ops is NATIVE
        torch.testing.assert_close(attn.ops.paged_decode(q, cache, batch(), attn.scale), expected,
                                   atol=2e-6, rtol=1e-5)
    finally:
        monkeypatch.delenv("SHARDLM_CPU_KERNELS")
        cpu_kernels.reselect()


def _reference_capped(q, cache, tables, lens, scale, window, softcap):
    """Written out in float64, sequence by sequence: the keys of the last ``window``
    positions, scores soft-capped as Gemma 2's reference does, then the softmax."""
    _, _, bs, num_kv, _ = cache.shape
    group, outs = q.shape[1] // num_kv, []
    for i, n in enumerate(lens):
        pos = torch.arange(max(0, n - window) if window else 0, n)
        blocks = tables[i][pos // bs]
        k, v = (cache[j, blocks, pos % bs].double().repeat_interleave(group, dim=1) for j in (0, 1))
        scores = torch.einsum("hd,thd->ht", q[i].double(), k) * scale  # (num_q, positions)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        outs.append(torch.einsum("ht,thd->hd", torch.softmax(scores, dim=-1), v))
    return torch.stack(outs).float()  # (seqs, num_q, hd)


CAPPED = [(None, 3.0), (4, None), (7, 2.5), (16, None), (1, None)]


@pytest.mark.parametrize("window,softcap", CAPPED, ids=[f"w{w}-cap{c}" for w, c in CAPPED])
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("kv", ["float32", "bfloat16"])
def test_sliding_window_and_softcap_on_every_path(shape, window, softcap, kv, isa):
    """Gemma's attention: a window starting inside a block (or beyond the context), soft-capped
    scores; the C kernel and the device-generic path against a float64 reference."""
    q, cache, tables, lens = _case(*shape, seed=2)
    cache = cache.to(getattr(torch, kv))
    scale = shape[2] ** -0.5
    expected = _reference_capped(q, cache.float(), tables, lens, scale, window, softcap)
    got = cpu_kernels.paged_decode_attention(q, cache, tables, torch.tensor(lens), scale, window,
                                             softcap)
    assert got is not None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    batch = AttnBatch([1] * len(lens), [n - 1 for n in lens], tables)
    torch.testing.assert_close(NATIVE.paged_decode(q, cache.float(), batch, scale, window, softcap),
                               expected, atol=1e-5, rtol=1e-5)


def test_kernel_declines_what_it_does_not_handle():
    q, cache, tables, lens = _case(9, 3, 64, 16)
    lens_t = torch.tensor(lens)
    assert cpu_kernels.paged_decode_attention(q.double(), cache.double(), tables, lens_t, 1.0) is None
    assert cpu_kernels.paged_decode_attention(q, cache, tables.int(), lens_t, 1.0) is None


def test_build_error_names_the_compiler(tmp_path, monkeypatch):
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    with pytest.raises(RuntimeError, match="failed on broken.c"):
        cpu_kernels.build([bad], tmp_path / "out")
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="no C compiler 'no-such-compiler-xyz'"):
        cpu_kernels.build([bad], tmp_path / "out")


def _packed(w):
    """A packed copy of ``w`` (packing works in place)."""
    panels = cpu_kernels.pack_weight(w.clone())
    assert panels is not None, "the kernel did not build on this machine (a C compiler and AVX2 are required)"
    return panels


# rows: every micro-kernel tail (1-5 after whole blocks of 6), one row chunk and several
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 64, 85, 200])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (7, 16), (1536, 576)])
def test_packed_linear_matches_torch(rows, in_features, out_features):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    panels = _packed(w)
    assert panels.shape == (out_features // 16, in_features, 16)
    exact = x.double() @ w.double().T  # float32 rounding error grows like sqrt(in_features)
    torch.testing.assert_close(cpu_kernels.packed_linear(x, panels).double(), exact,
                               atol=1e-5 * in_features ** 0.5, rtol=1e-5)


def test_packed_linear_takes_strided_input_and_checks_width():
    w = torch.randn(32, 64)
    panels = _packed(w)
    x = torch.randn(64, 5).T  # (5, 64), not contiguous
    torch.testing.assert_close(cpu_kernels.packed_linear(x, panels), x @ w.T, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="does not match a packed float32 weight of 64 input"):
        cpu_kernels.packed_linear(torch.randn(2, 63), panels)
    with pytest.raises(ValueError, match="float64"):
        cpu_kernels.packed_linear(torch.randn(2, 64, dtype=torch.float64), panels)


def test_pack_weight_declines_what_the_kernel_cannot_run():
    assert cpu_kernels.pack_weight(torch.randn(10, 64)) is None  # rows not a multiple of 16
    assert cpu_kernels.pack_weight(torch.randn(16, 64, dtype=torch.float64)) is None
    assert cpu_kernels.pack_weight(torch.randn(16)) is None


def test_pack_weights_keeps_every_layer_output():
    """Column/row-parallel layers and a tied embedding + LM head give the same outputs after
    the CPU path packs them as before (plain torch matmul and lookup); an unpackable layer
    (17 rows) keeps its plain weight and still works."""
    from layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from layers.linear import ColumnParallelLinear, RowParallelLinear
    from workers.comm import TrivialCommunicator

    comm = TrivialCommunicator()
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "col": ColumnParallelLinear(64, [(None, 0, 48)], True, torch.float32),
        "odd": ColumnParallelLinear(64, [(None, 0, 17)], False, torch.float32),
        "row": RowParallelLinear([(0, 48)], 64, True, torch.float32, comm),
        "embed": VocabParallelEmbedding(160, 64, torch.float32, comm),
    })
    model["head"] = ParallelLMHead(160, 64, torch.float32, comm, tied_to=model["embed"])
    for param in model.parameters():
        param.data.normal_()
    x, ids = torch.randn(9, 64), torch.tensor([0, 5, 17, 159, 16, 31])
    with torch.inference_mode():
        def outputs():
            return [model["col"](x), model["odd"](x), model["row"](model["col"](x)),
                    model["embed"](ids), model["head"](x)]

        before = outputs()
        torch.testing.assert_close(before[0], x @ model["col"].weight.T + model["col"].bias)
        storage = model["head"].weight.data_ptr()
        ops = CpuOps()
        assert use_ops(model, ops) == 3  # col, row, and the shared embedding/head weight once
        assert model["head"].weight.data_ptr() == storage  # packed in place, no second copy
        assert model["odd"].weight.dim() == 2 and model["head"].weight.dim() == 3
        for got, want in zip(outputs(), before):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(ops.linear(x, model["odd"].weight), x @ model["odd"].weight.T)


@pytest.mark.parametrize("rows", [1, 3, 200])  # 200 x 576: enough work for both threads
def test_rms_norm_kernels_match_transformers(rows):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from layers.norm import RMSNorm

    ref = LlamaRMSNorm(576, eps=1e-5)
    ref.weight.data.normal_()
    ours = RMSNorm(576, 1e-5, torch.float32)
    ours.weight.data.copy_(ref.weight.data)
    x, residual = torch.randn(rows, 576) * 3, torch.randn(rows, 576)
    with torch.no_grad():
        got = cpu_kernels.rms_norm(x, ours.weight, 1e-5)
        assert got is not None
        torch.testing.assert_close(got, ref(x), atol=1e-5, rtol=1e-5)
        normed, total = ours.forward_add(x, residual)
        torch.testing.assert_close(total, x + residual, atol=0, rtol=0)
        torch.testing.assert_close(normed, ref(x + residual), atol=1e-5, rtol=1e-5)
    assert cpu_kernels.rms_norm(torch.randn(2, 60), torch.ones(60), 1e-5) is None  # width % 8


ACTIVATIONS = {"silu_mul": F.silu, "gelu_tanh_mul": lambda g: F.gelu(g, approximate="tanh")}


@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("inter", [1536, 24, 13])  # 24: a whole and a partial AVX-512 vector
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gated_activations_match_torch(rows, inter, act, isa):
    gate_up = torch.randn(rows, 2 * inter) * 8  # large |gate| on both sides: exp range
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -1e-8])
    gate_up[0, 4:6] = torch.tensor([-200.0, float("nan")])  # past exp's clamp; NaN stays NaN
    got = getattr(cpu_kernels, act)(gate_up)
    assert got is not None
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(got, ACTIVATIONS[act](gate) * up, atol=1e-5, rtol=1e-5,
                               equal_nan=True)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_an_activation_is_the_same_bits_wherever_its_element_sits(act, isa):
    """Deterministic mode's premise for the activations: a tensor-parallel slice of the
    features (any width: 9 of 26, say) gets the bits the whole row had at those features,
    though its elements sit elsewhere in the vectors (torch's own silu and gelu do not
    promise this: their last partial vector runs other code)."""
    gate_up = torch.randn(8, 2 * 26) * 6
    whole = getattr(cpu_kernels, act)(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    for start, width in ((0, 9), (9, 9), (18, 8), (5, 1), (3, 17)):
        part = torch.cat([gate[:, start:start + width], up[:, start:start + width]], 1).contiguous()
        assert torch.equal(getattr(cpu_kernels, act)(part), whole[:, start:start + width])
        for dtype in (torch.bfloat16,):
            got = getattr(cpu_kernels, act)(part.to(dtype))
            want = getattr(cpu_kernels, act)(gate_up.to(dtype))[:, start:start + width]
            assert torch.equal(got, want)
    x = torch.randn(37) * 5
    sig = cpu_kernels.sigmoid(x)
    torch.testing.assert_close(sig, torch.sigmoid(x), atol=1e-7, rtol=1e-6)
    assert torch.equal(cpu_kernels.sigmoid(x[20:25].clone()), sig[20:25])


@pytest.mark.parametrize("inter", [1536, 24, 13])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gated_activations_on_bf16_round_the_float32_result_once(inter, act, isa):
    """bf16 in and out (a bf16 GEMM's output): torch's act(gate) * up of the values widened
    to float32, rounded to bf16 (within one bf16 step where the float32 results differ in the
    last bits across a rounding boundary)."""
    gate_up = (torch.randn(64, 2 * inter) * 8).bfloat16()
    gate_up[0, :3] = torch.tensor([-100.0, float("nan"), float("inf")])
    got = getattr(cpu_kernels, act)(gate_up)
    assert got is not None and got.dtype == torch.bfloat16
    gate, up = gate_up.float().chunk(2, dim=-1)
    want = (ACTIVATIONS[act](gate) * up).bfloat16()
    # atol: results near 0 (a very negative gate), where torch's 0.5 x (1 + tanh) cancels
    torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=2 ** -7, equal_nan=True)
    # almost all exactly the rounded reference; for GELU where the gate is > -4 only: below,
    # torch's 0.5 x (1 + tanh) has lost most of its bits (the kernel computes x sigmoid(2z))
    accurate = gate > -4 if act == "gelu_tanh_mul" else torch.ones_like(gate, dtype=torch.bool)
    assert (got == want)[accurate].float().mean() > 0.99


@pytest.mark.parametrize("hd", [16, 64])
def test_rope_on_bf16_heads_is_the_float32_rotation_rounded_once(hd):
    """Rotary embedding in place on the q/k heads of a bf16 fused qkv output (a strided view):
    the float32 kernel's rotation of the same values, rounded to bf16, and torch's rotation
    (computed in float32, rounded) within one bf16 step; the v heads are untouched."""
    from layers.ops import rotate

    g = torch.Generator().manual_seed(5)
    tokens, nq, nkv = 37, 9, 3
    qkv = (torch.randn(tokens, (nq + 2 * nkv) * hd, generator=g) * 4).bfloat16()
    heads = qkv.view(tokens, nq + 2 * nkv, hd)[:, :nq + nkv]
    angles = torch.rand(tokens, hd // 2, generator=g) * 50
    cos, sin = angles.cos(), angles.sin()
    as_float = heads.float().contiguous()
    before = qkv.clone()
    assert cpu_kernels.rope_inplace(as_float, cos, sin)
    assert cpu_kernels.rope_inplace(heads, cos, sin)
    assert torch.equal(heads, as_float.bfloat16())
    full = (torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None])
    want = rotate(before.view(tokens, -1, hd)[:, :nq + nkv], *full)
    torch.testing.assert_close(heads.float(), want.float(), atol=1e-2, rtol=2 ** -7)
    assert torch.equal(qkv.view(tokens, -1, hd)[:, nq + nkv:], before.view(tokens, -1, hd)[:, nq + nkv:])


def test_write_kv_matches_index_copy_and_checks_slots():
    cache = torch.randn(2, 8, 4, 3, 16)  # (2, blocks, block_size, kv, hd)
    qkv = torch.randn(5, (9 + 3 + 3) * 16)  # fused rows: k and v are strided views
    heads = qkv.view(5, 15, 16)
    k, v = heads[:, 9:12], heads[:, 12:]
    slots = torch.tensor([31, 0, 7, 8, 20])
    want = cache.clone().view(2, 32, 3, 16)
    want[0].index_copy_(0, slots, k)
    want[1].index_copy_(0, slots, v)
    assert cpu_kernels.write_kv(k, v, cache, slots)
    assert torch.equal(cache.view(2, 32, 3, 16), want)
    with pytest.raises(IndexError, match=r"slot out of range \[0, 32\)"):
        cpu_kernels.write_kv(k, v, cache, torch.tensor([0, 1, 2, 3, 32]))


def test_write_kv_into_a_bf16_cache_rounds_as_torch_does():
    """Each value rounded to nearest even, as torch's own float32 -> bfloat16 conversion;
    slots out of range are refused before anything is written."""
    g = torch.Generator().manual_seed(3)
    cache = torch.zeros(2, 8, 4, 3, 16, dtype=torch.bfloat16)
    heads = (torch.randn(5, 15, 16, generator=g) * 10).view(5, 15, 16)
    heads[0, 9, :4] = torch.tensor([1.00390625, 1.01171875, -2.0078125, 3.0e38])  # ties, huge
    k, v = heads[:, 9:12], heads[:, 12:]
    slots = torch.tensor([31, 0, 7, 8, 20])
    want = cache.clone().view(2, 32, 3, 16)
    want[0].index_copy_(0, slots, k.to(torch.bfloat16))
    want[1].index_copy_(0, slots, v.to(torch.bfloat16))
    assert cpu_kernels.write_kv(k, v, cache, slots)
    assert torch.equal(cache.view(2, 32, 3, 16), want)
    before = cache.clone()
    with pytest.raises(IndexError):
        cpu_kernels.write_kv(k, v, cache, torch.tensor([0, 1, 2, 3, 32]))
    assert torch.equal(cache, before)


def test_write_kv_copies_bf16_keys_and_values_into_a_bf16_cache():
    g = torch.Generator().manual_seed(4)
    cache = torch.randn(2, 8, 4, 3, 16, generator=g).bfloat16()
    heads = torch.randn(5, 15, 16, generator=g).bfloat16()  # fused rows: strided k and v
    k, v = heads[:, 9:12], heads[:, 12:]
    slots = torch.tensor([31, 0, 7, 8, 20])
    want = cache.clone().view(2, 32, 3, 16)
    want[0].index_copy_(0, slots, k)
    want[1].index_copy_(0, slots, v)
    assert cpu_kernels.write_kv(k, v, cache, slots)
    assert torch.equal(cache.view(2, 32, 3, 16), want)
    before = cache.clone()
    with pytest.raises(IndexError):
        cpu_kernels.write_kv(k, v, cache, torch.tensor([0, 1, 2, 3, 32]))
    assert torch.equal(cache, before)
    assert not cpu_kernels.write_kv(k, v, torch.zeros(2, 8, 4, 3, 16), slots)  # bf16 into float32: torch


LOWP_ROWS = [1, 2, 3, 4, 5, 13, 64]
LOWP_SHAPES = [(576, 960), (1536, 576), (48, 16)]  # in, out; 48: not a multiple of 32


@pytest.mark.parametrize("rows", LOWP_ROWS)
@pytest.mark.parametrize("in_features,out_features", LOWP_SHAPES)
def test_bf16_linear_matches_torch(rows, in_features, out_features, isa):
    """bf16 weights widened against float32 activations: torch's float32 matmul of the same
    bf16 values is the reference (the sums differ in order only)."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g).to(torch.bfloat16)
    got = cpu_kernels.lowp_linear(x, w)
    assert got is not None, "the kernel did not build on this machine (AVX2 and FMA are required)"
    torch.testing.assert_close(got, x @ w.float().T, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", LOWP_ROWS)
@pytest.mark.parametrize("in_features,out_features", LOWP_SHAPES)
def test_int8_linear_matches_torch_int8_weight_matmul(rows, in_features, out_features, isa):
    """int8 weights with a scale per output feature against torch's own weight-only int8
    matmul (``_weight_int8pack_mm``); the kernel's 14-bit activations cost at most about
    1e-4 of the output's scale."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=g)
    q, scales = quantize_int8(torch.randn(out_features, in_features, generator=g))
    got = cpu_kernels.lowp_linear(x, q, scales)
    assert got is not None
    want = torch.ops.aten._weight_int8pack_mm(x, q, scales)
    assert (got - want).abs().max() <= 3e-4 * want.abs().max()
    dequantized = x @ (q.float() * scales[:, None]).T  # the float32 reference of the same weights
    assert (got - dequantized).abs().max() <= 3e-4 * dequantized.abs().max()


def test_quantize_int8_keeps_each_row_within_half_a_step():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different ranges
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-12).all()


def test_lowp_linear_declines_what_it_does_not_handle(isa):
    x = torch.randn(2, 40)
    assert cpu_kernels.lowp_linear(x, torch.randn(16, 40).to(torch.bfloat16)) is None  # in % 16
    assert cpu_kernels.lowp_linear(torch.randn(2, 48), torch.randn(6, 48).to(torch.bfloat16)) is None
    q, _ = quantize_int8(torch.randn(16, 48))
    assert cpu_kernels.lowp_linear(torch.randn(2, 48), q) is None  # int8 without its scales


AMX = "amx_bf16" in cpu_flags()


@pytest.mark.parametrize("rows", [1, 8, 33, 64, 300])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 576), (64, 32)])
def test_amx_linear_matches_torch(rows, in_features, out_features):
    """bf16 products summed in float32 on AMX tiles: torch's float32 matmul of the bf16-rounded
    activations and weights is the reference (the sums differ in order only); a bf16 output
    is that rounded once. A CPU without AMX gets no tile copy (the kernel declines)."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=g)
    w = (torch.randn(out_features, in_features, generator=g) * 0.1).to(torch.bfloat16)
    packed = cpu_kernels.amx_pack(w)
    assert (packed is not None) == AMX
    if packed is None:
        return
    want = x.to(torch.bfloat16).float() @ w.float().T
    torch.testing.assert_close(cpu_kernels.amx_linear(x, packed), want, atol=1e-5, rtol=1e-5)
    from_bf16 = cpu_kernels.amx_linear(x.to(torch.bfloat16), packed, torch.bfloat16)
    assert from_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(from_bf16.float(), want, atol=1e-5, rtol=2 ** -8)


def test_amx_pack_declines_widths_off_the_tiles():
    assert cpu_kernels.amx_pack(torch.randn(48, 64).to(torch.bfloat16)) is None  # out % 32
    assert cpu_kernels.amx_pack(torch.randn(64, 48).to(torch.bfloat16)) is None  # in % 32
    assert cpu_kernels.amx_pack(torch.randn(64, 64)) is None  # float32


@pytest.mark.parametrize("rows", [3, 8, 64, 1000])
def test_bf16_linear_op_at_every_row_count(rows, isa):
    """CpuOps' bf16 matmul across its three kernels (the C kernel below 8 rows, the tiled GEMM
    up to AMX_MAX_ROWS, torch's GEMM past it) against torch's float32 matmul of the same bf16
    weight: within bf16 rounding of the activations."""
    from layers.cpu.ops import AMX_MAX_ROWS

    g = torch.Generator().manual_seed(rows)
    ops = CpuOps(weights="bfloat16", kv_cache_dtype=torch.bfloat16)
    weight = torch.nn.Parameter((torch.randn(960, 576, generator=g) * 0.05).to(torch.bfloat16),
                                requires_grad=False)
    ops._tile_copy(weight)
    assert 8 < AMX_MAX_ROWS < 1000
    x = torch.randn(rows, 576, generator=g)
    want = x @ weight.float().T
    got = ops.linear(x, weight)
    assert got.dtype == torch.float32 and got.shape == (rows, 960)
    assert (got - want).abs().max() <= 2 ** -8 * want.abs().max()


@pytest.mark.parametrize("num_q,num_kv,hd", [(9, 3, 64), (4, 4, 32), (8, 1, 16)])
@pytest.mark.parametrize("n,offset", [(1, 0), (7, 0), (48, 0), (100, 0), (5, 40), (49, 17)])
def test_prefill_attention_matches_torch_sdpa(num_q, num_kv, hd, n, offset):
    """The C prefill kernel on strided slices of a fused qkv buffer (the model's layout)
    against torch's SDPA with an explicit causal mask and the KV heads repeated per group."""
    g = torch.Generator().manual_seed(n * 100 + offset)
    ctx = n + offset
    fused = torch.randn(ctx, (num_q + 2 * num_kv) * hd, generator=g).view(ctx, -1, hd)
    q = fused[offset:, :num_q]
    k, v = fused[:, num_q:num_q + num_kv], fused[:, num_q + num_kv:]
    got = cpu_kernels.prefill_attention(q, k, v, hd ** -0.5)
    assert got is not None, "the kernel did not build on this machine"
    group = num_q // num_kv
    mask = torch.arange(ctx)[None, :] <= (torch.arange(n) + offset)[:, None]  # (n, ctx)
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1),
        v.repeat_interleave(group, 1).transpose(0, 1), attn_mask=mask, scale=hd ** -0.5)
    torch.testing.assert_close(got, want.transpose(0, 1), atol=2e-5, rtol=1e-4)


PREFILL_CAPPED = [(5, None, 40, 0), (None, 2.0, 30, 7), (21, 3.0, 70, 33), (1, None, 9, 4)]


@pytest.mark.parametrize("window,softcap,n,offset", PREFILL_CAPPED)
def test_prefill_attention_with_window_and_softcap(window, softcap, n, offset):
    """Gemma's prompt attention in the C kernel (windows inside a panel, spanning blocks of
    queries, of one key) against the float64 reference of the decode test, row by row."""
    g = torch.Generator().manual_seed(n + offset)
    num_q, num_kv, hd, ctx = 6, 2, 32, n + offset
    q = torch.randn(n, num_q, hd, generator=g)
    k, v = torch.randn(ctx, num_kv, hd, generator=g), torch.randn(ctx, num_kv, hd, generator=g)
    got = cpu_kernels.prefill_attention(q, k, v, hd ** -0.5, window, softcap)
    assert got is not None
    # each query as a decode of its own: context offset + i + 1, the keys in one block
    cache = torch.stack([k, v])[:, None]  # (2, 1 block, ctx, num_kv, hd)
    want = _reference_capped(q, cache, torch.zeros(n, 1, dtype=torch.int64),
                             [offset + i + 1 for i in range(n)], hd ** -0.5, window, softcap)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_prefill_attention_declines_unsupported_shapes():
    q, k = torch.randn(4, 2, 8), torch.randn(4, 2, 8)  # head_dim 8: not a multiple of 16
    assert cpu_kernels.prefill_attention(q, k, k, 1.0) is None
    q, k = torch.randn(4, 2, 16), torch.randn(3, 2, 16)  # fewer keys than queries
    assert cpu_kernels.prefill_attention(q, k, k, 1.0) is None


def _tiny_llama(seed: int, ops: CpuOps, blocks: int = 32):
    """A 2-layer Llama (GQA 6/2, head_dim 16) with random weights, packed (or converted to the
    ops' weight format), with a KV cache of the ops' dtype (``blocks`` blocks of 8 tokens)."""
    from layers.models import build_model
    from workers import kv_cache
    from workers.comm import TrivialCommunicator

    torch.manual_seed(seed)
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 160, "hidden_size": 96,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 6,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 256}
    model = build_model(config, TrivialCommunicator(), torch.float32)
    for param in model.parameters():
        param.data.normal_(0, 0.2)
    assert use_ops(model, ops) == 2 * 4 + 1
    kv_cache.allocate(model, blocks, 8, ops.kv_cache_dtype, torch.device("cpu"))
    return model


@pytest.mark.parametrize("weights,kv", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                        ("int8", torch.bfloat16), ("int8", torch.float32)])
@pytest.mark.parametrize("seqs", [1, 3, 6, 9])
def test_fused_decode_layer_matches_op_by_op(seqs, weights, kv, monkeypatch, isa):
    """A decode step through the two-call C layers gives the hidden states and the cache
    contents of the op-by-op path (itself checked against transformers end to end). bf16
    weights at 6 and 9 rows (past AMX_MIN_ROWS) run the layer on AMX tiles where the CPU has
    AMX; without AMX, at 6 rows on the register kernel and at 9 (past BF16_KERNEL_ROWS) op
    by op."""
    from layers.attention import AttnBatch
    from layers.cpu.ops import AMX_MIN_ROWS, BF16_KERNEL_ROWS

    taken = []
    for name in ("attention_half", "mlp_half"):  # record that the kernels ran
        real = getattr(cpu_decode_layer.DecodeLayer, name)
        monkeypatch.setattr(cpu_decode_layer.DecodeLayer, name,
                            lambda *a, _real=real, **k: taken.append(_real(*a, **k)) or taken[-1])

    lens = [5, 9, 16, 3, 12, 7, 15, 2, 11][:seqs]
    tables = torch.tensor([[3, 7, 1], [0, 2, 5], [4, 6, 8]] + [[9 + 2 * i, 10 + 2 * i, 31]
                                                              for i in range(6)])[:seqs]
    positions = torch.tensor(lens) - 1  # each sequence's new token, its keys written now
    slots = torch.stack([tables[i, p // 8] * 8 + p % 8 for i, p in enumerate(positions.tolist())])
    ids = torch.tensor([11, 57, 140, 3, 99, 150, 42, 7, 120])[:seqs]
    outs, caches, formats = [], [], []
    for fused in (True, False):
        ops = CpuOps(fused_layers=fused, weights=weights, kv_cache_dtype=kv)
        model = _tiny_llama(seed=seqs, ops=ops)
        batch = AttnBatch([1] * seqs, [n - 1 for n in lens], tables, slots)
        with torch.inference_mode():
            outs.append(model(ids, positions, batch))
        caches.append([layer.self_attn.attn.kv_cache.clone() for layer in model.layers.values()])
        kernel = ops._kernel(model.layers["0"])
        formats.append(kernel and kernel.applies(seqs) and kernel._weights(seqs)[0])
    amx = cpu_kernels.amx_pack(torch.zeros(32, 32, dtype=torch.bfloat16)) is not None
    if weights == "bfloat16":  # on the tiles from AMX_MIN_ROWS (5) where AMX runs
        assert (formats[0] == cpu_decode_layer.FMT_AMX) == (amx and seqs >= AMX_MIN_ROWS)
    # without bf16 dot products the register kernel takes every row count
    native_bf16 = bool(cpu_flags() & BF16_DOT_FLAGS)
    fused_expected = weights != "bfloat16" or seqs < BF16_KERNEL_ROWS or amx or not native_bf16
    if fused_expected:  # 2 layers x 2 halves, fused run
        assert len(taken) == 4 and all(out is not None for out in taken)
    else:  # bf16 dot products without AMX: bf16 weights at 9 rows go op by op
        assert all(out is None for out in taken)
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-5)
    for fused_cache, plain_cache in zip(*caches):
        torch.testing.assert_close(fused_cache, plain_cache, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rows,n", [(1, 49152), (64, 24576), (3, 37), (5, 16)])
def test_argmax_rows_matches_torch_max_with_first_index_on_ties(rows, n, isa):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(rows, n, generator=g)
    x[0, n // 3] = x[0, n - 1] = x[0].max() + 1  # a tie: the first one wins
    if rows > 1:
        x[-1] = -torch.inf  # nothing larger than -inf: index 0, as torch gives it
    got = cpu_kernels.argmax_rows(x)
    assert got is not None
    best, index = x.max(dim=-1)
    assert torch.equal(got[0], best) and torch.equal(got[1], index)
    assert got[1][0] == n // 3


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_gumbel_argmax_rows_is_the_samplers_noise_made_in_place(rows, isa):
    """The kernel against the sampler's torch code (x / temp + gumbel_noise, argmax): the same
    hash bits; only the last bit of a logarithm may differ, so a token may differ only where
    two scores are that close. Filtered entries (-inf) never win."""
    from layers.sampler import _signed, gumbel_noise

    n = 49152
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, n, generator=g) * 4
    x[:, ::3] = -torch.inf
    seeds = torch.tensor([_signed(0xDEADBEEF12345678 + 977 * r) for r in range(rows)])
    positions = torch.arange(rows, dtype=torch.int64) * 37 + 5
    temps = torch.linspace(0.3, 1.7, rows)
    got = cpu_kernels.gumbel_argmax_rows(x, seeds, positions, temps)
    assert got is not None and got.dtype == torch.int64 and got.shape == (rows,)
    scores = x / temps[:, None] + gumbel_noise(seeds, positions, n)  # (rows, n)
    want = scores.argmax(dim=-1)
    picked = scores.gather(1, got[:, None])[:, 0]
    assert torch.allclose(picked, scores.max(dim=-1).values, rtol=0, atol=1e-5)
    assert (got == want).float().mean() >= 0.9 and (got % 3 != 0).all()


# (fresh prompt, decoding, fresh prompt, decoding, continuing chunk) tokens; rows in all
STEPS = {"amx": [10, 1, 7, 1, 5], "onednn": [500, 1, 300, 1, 50]}


@pytest.mark.parametrize("gemm", list(STEPS))
def test_a_prompt_step_carried_in_bf16_keeps_the_float32_carrys_values(gemm, monkeypatch, isa):
    """A step of fresh prompts, a continuing chunk and decoding sequences, bf16 weights and
    cache. Where prompt attention runs in bf16 (AMX), CpuOps carries the step's q/k/v and
    attention output in bf16 (attention_dtype) instead of float32. Past AMX_MAX_ROWS rows,
    where the q/k/v GEMM rounds its output to bf16 itself, the prompt rows' hidden states and
    their keys and values come out bit for bit as with the float32 carry; below, q and k are
    rounded once more before rotation (close). Decoding rows differ by their query rounded."""
    from layers.attention import AttnBatch
    from layers.cpu.ops import AMX_MAX_ROWS

    query_lens, start_pos = STEPS[gemm], [0, 8, 0, 14, 6]
    assert (sum(query_lens) > AMX_MAX_ROWS) == (gemm == "onednn")
    per_seq = -(-(max(query_lens) + 14) // 8)  # blocks per sequence
    tables = torch.arange(5 * per_seq).view(5, per_seq)
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(start_pos, query_lens)])
    seq_of_row = torch.cat([torch.full((n,), i) for i, n in enumerate(query_lens)])
    slots = tables[seq_of_row, positions // 8] * 8 + positions % 8
    ids = torch.randint(0, 160, (len(positions),), generator=torch.Generator().manual_seed(1))
    decode_rows = torch.tensor([sum(query_lens[:i]) for i in (1, 3)])  # sequences 1 and 3
    outs, caches, chosen = [], [], []
    for carry in ("bf16", "float32"):
        ops = CpuOps(weights="bfloat16", kv_cache_dtype=torch.bfloat16)
        if carry == "float32":
            monkeypatch.setattr(ops, "attention_dtype", lambda attn, batch: None)
        model = _tiny_llama(seed=7, ops=ops, blocks=5 * per_seq)
        g = torch.Generator().manual_seed(2)
        for layer in model.layers.values():  # earlier tokens of the continuing sequences
            cache = layer.self_attn.attn.kv_cache
            cache.copy_(torch.randn(cache.shape, generator=g))
        batch = AttnBatch(query_lens, start_pos, tables, slots)
        chosen.append(ops.attention_dtype(model.layers["0"].self_attn, batch))
        with torch.inference_mode():
            outs.append(model(ids, positions, batch))
        caches.append([layer.self_attn.attn.kv_cache.clone() for layer in model.layers.values()])
    amx = "amx_bf16" in cpu_flags()
    assert chosen == [torch.bfloat16 if amx else None, None]
    prompt_rows = torch.ones(len(positions), dtype=torch.bool)
    prompt_rows[decode_rows] = False
    if gemm == "onednn" or not amx:
        assert torch.equal(outs[0][prompt_rows], outs[1][prompt_rows])
        for bf16_cache, float_cache in zip(*caches):  # the prompt tokens' keys and values
            kept = [c.view(2, -1, *c.shape[3:])[:, slots[prompt_rows]] for c in (bf16_cache, float_cache)]
            assert torch.equal(*kept)
    torch.testing.assert_close(outs[0], outs[1], atol=0.02, rtol=0.02)
    for bf16_cache, float_cache in zip(*caches):
        torch.testing.assert_close(bf16_cache, float_cache, atol=0.02, rtol=0.02)


DPBF16 = "avx512_bf16" in cpu_flags()
DPBF16_ROWS = [*range(1, 10), 17, 65, 300]
# in, out; 34: in % 32 != 0 (x's masked rounding), 32 outputs: one panel
DPBF16_SHAPES = [(576, 3072), (1536, 576), (576, 1536), (34, 32)]


@pytest.mark.skipif(not DPBF16, reason="no AVX512-BF16 on this CPU")
@pytest.mark.parametrize("in_features,out_features", DPBF16_SHAPES)
def test_dpbf16_linear_matches_float64(in_features, out_features):
    """bf16 products summed in float32 by vdpbf16ps: the float64 matmul of the activations
    rounded to bf16 (nearest even, as torch rounds) and the weight is the reference, each output
    within 1e-5 of the sum of its products' magnitudes (the float32 sums' rounding; rounding
    x otherwise would cost 2^-9)."""
    g = torch.Generator().manual_seed(in_features + out_features)
    w = (torch.randn(out_features, in_features, generator=g) * 0.1).to(torch.bfloat16)
    packed = cpu_kernels.dpbf16_pack(w)
    assert packed is not None and packed.shape == w.shape and packed.dtype == torch.bfloat16
    for rows in DPBF16_ROWS:
        x = torch.randn(rows, in_features, generator=g)
        got = cpu_kernels.dpbf16_linear(x, packed)
        assert got is not None and got.dtype == torch.float32 and got.shape == (rows, out_features)
        xb = x.to(torch.bfloat16).double()
        want = xb @ w.double().T
        bound = 1e-5 * (xb.abs() @ w.double().abs().T)
        assert ((got.double() - want).abs() <= bound).all(), f"{rows} rows"


@pytest.mark.skipif(not DPBF16, reason="no AVX512-BF16 on this CPU")
def test_dpbf16_linear_gives_a_row_the_same_bits_in_any_batch_and_thread_count():
    """Deterministic mode: a row's outputs do not depend on how many rows share the call, where
    the row sits among them, or how many threads run it. 18 panels of 32 outputs split unevenly
    over the threads' tiles; 800 rows of 1536 inputs pass the weight in several chunks."""
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(576, 1536, generator=g) * 0.05).to(torch.bfloat16)
    packed = cpu_kernels.dpbf16_pack(w)
    x = torch.randn(800, 1536, generator=g)
    full = cpu_kernels.dpbf16_linear(x, packed)
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33, 64, 65, 300, 800):
        assert torch.equal(cpu_kernels.dpbf16_linear(x[:m], packed), full[:m]), f"{m} rows"
    for i in (0, 1, 11, 12, 13, 499, 799):  # alone, and last of a batch that ends with it
        assert torch.equal(cpu_kernels.dpbf16_linear(x[i:i + 1], packed), full[i:i + 1])
        assert torch.equal(cpu_kernels.dpbf16_linear(x[:i + 1].flip(0), packed)[0], full[i])
    order = torch.randperm(800, generator=g)[:301]
    assert torch.equal(cpu_kernels.dpbf16_linear(x[order], packed), full[order])
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            for m in (1, 7, 65, 800):
                assert torch.equal(cpu_kernels.dpbf16_linear(x[:m], packed), full[:m]), (count, m)
    finally:
        torch.set_num_threads(threads)
    # an output past the caches (written with streaming stores) against a few of its rows
    w = (torch.randn(4096, 64, generator=g) * 0.1).to(torch.bfloat16)
    packed = cpu_kernels.dpbf16_pack(w)
    full = cpu_kernels.dpbf16_linear(x[:600, :64], packed)
    assert torch.equal(cpu_kernels.dpbf16_linear(x[:5, :64], packed), full[:5])
    want = x[:600, :64].to(torch.bfloat16).double() @ w.double().T
    torch.testing.assert_close(full.double(), want, atol=1e-5, rtol=1e-5)


def test_dpbf16_declines_what_it_does_not_handle(isa):
    """Shapes off the panels and dtypes it does not take; a CPU (or build: the AVX2 one)
    without AVX512-BF16 packs nothing and multiplies nothing."""
    w = torch.randn(64, 64).to(torch.bfloat16)
    x = torch.randn(2, 64)
    lib = cpu_kernels.load()
    if isa == "avx2" or not DPBF16:
        assert not lib.dpbf16_available()
        assert cpu_kernels.dpbf16_pack(w) is None
        assert cpu_kernels.dpbf16_linear(x, w) is None  # (an unpacked weight: never read)
        assert cpu_kernels.dpbf16_linear(x[:0], w) is None
        return
    assert lib.dpbf16_available()
    assert cpu_kernels.dpbf16_pack(torch.randn(48, 64).to(torch.bfloat16)) is None  # out % 32
    assert cpu_kernels.dpbf16_pack(torch.randn(64, 33).to(torch.bfloat16)) is None  # in odd
    assert cpu_kernels.dpbf16_pack(torch.randn(64, 64)) is None  # float32
    packed = cpu_kernels.dpbf16_pack(w)
    assert cpu_kernels.dpbf16_linear(x.double(), packed) is None  # float32 activations only
    assert cpu_kernels.dpbf16_linear(x[:0], packed).shape == (0, 64)
    with pytest.raises(ValueError):
        cpu_kernels.dpbf16_linear(torch.randn(2, 32), packed)
    with pytest.raises(ValueError):
        cpu_kernels.dpbf16_linear(x, packed, out_features=32)

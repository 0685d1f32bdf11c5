"""The C paged-decode kernel against torch's own attention (scaled_dot_product_attention on
keys and values gathered by plain indexing), and the PyTorch fallback path against the same
reference. Shapes cover GQA ratios 1, 3 and 8, contexts of one token, a block boundary and
one past it, and block tables in scrambled order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers import cpu_kernels
from layers.attention import Attention, AttnBatch

SHAPES = [(9, 3, 64, 16), (4, 4, 32, 4), (8, 1, 128, 8)]  # num_q, num_kv, head_dim, block_size


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
def test_kernel_matches_torch_attention(shape):
    q, cache, tables, lens = _case(*shape)
    scale = shape[2] ** -0.5
    got = cpu_kernels.paged_decode_attention(q, cache, tables, torch.tensor(lens), scale)
    assert got is not None, "the kernel did not build on this machine (a C compiler is required)"
    torch.testing.assert_close(got, _reference(q, cache, tables, lens, scale), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_attention_module_paths_agree(shape, monkeypatch):
    """Attention._paged_decode through the kernel and through the torch fallback."""
    q, cache, tables, lens = _case(*shape, seed=1)
    attn = Attention(shape[0], shape[1], shape[2])
    attn.kv_cache = cache
    expected = _reference(q, cache, tables, lens, attn.scale)
    batch = lambda: AttnBatch([1] * len(lens), [n - 1 for n in lens], tables)
    torch.testing.assert_close(attn._paged_decode(q, batch()), expected, atol=2e-6, rtol=1e-5)
    monkeypatch.setenv("SHARDLM_CPU_KERNELS", "0")
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.paged_decode_attention(q, cache, tables, torch.tensor(lens), 1.0) is None
        torch.testing.assert_close(attn._paged_decode(q, batch()), expected, atol=2e-6, rtol=1e-5)
    finally:
        cpu_kernels.load.cache_clear()


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


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("in_features,out_features", [(576, 1539), (64, 7), (1536, 576)])
def test_skinny_linear_matches_torch(rows, in_features, out_features):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    got = cpu_kernels.skinny_linear(x, w)
    assert got is not None, "the kernel did not build on this machine (a C compiler is required)"
    torch.testing.assert_close(got, x @ w.T, atol=1e-4, rtol=1e-5)


def test_skinny_linear_declines_and_linear_falls_back():
    from layers.linear import linear

    w, b = torch.randn(10, 64), torch.randn(10)
    too_many, odd_width = torch.randn(9, 64), torch.randn(2, 60)
    assert cpu_kernels.skinny_linear(too_many, w) is None
    assert cpu_kernels.skinny_linear(odd_width, torch.randn(10, 60)) is None
    assert cpu_kernels.skinny_linear(torch.randn(2, 64, dtype=torch.float64), w.double()) is None
    for x in (too_many, torch.randn(3, 64)):  # torch path and kernel path, bias added in both
        torch.testing.assert_close(linear(x, w, b), x @ w.T + b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 9, 64])
def test_wide_linear_matches_torch(rows):
    """The LM head's matmul (skinny kernel for few rows, oneDNN above) against plain matmul."""
    from layers.linear import wide_linear

    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 64, generator=g), torch.randn(5003, 64, generator=g)
    torch.testing.assert_close(wide_linear(x, w), x @ w.T, atol=1e-4, rtol=1e-5)

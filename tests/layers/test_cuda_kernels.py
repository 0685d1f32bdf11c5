"""The CUDA platform's triton kernels (layers.cuda) and the CUDA-graph decode runner
(workers.cuda_graphs), checked on the CPU: conftest sets TRITON_INTERPRET=1, so triton's
interpreter runs the same kernel code on CPU tensors. The reference is torch's own
attention (layers.ops.TorchOps: scaled_dot_product_attention over gathered keys), itself
checked against transformers in tests/cluster/test_model_parity.py. What the interpreter
cannot show (compiled code, the capture of a graph, speed) is checked by `make gpu-check`
on a GPU."""

from __future__ import annotations

import pytest
import torch

from layers.attention import AttnBatch
from layers.cuda import kernels
from layers.cuda.ops import CudaOps
from layers.models import build_model
from layers.ops import NATIVE
from layers.platform import use_ops
from workers import kv_cache
from workers.comm import TrivialCommunicator
from workers.cuda_graphs import DecodeGraphs, bucket_sizes

BLOCK = 16


def _slots(tables: torch.Tensor, query_lens: list[int], starts: list[int]) -> torch.Tensor:
    slots = []
    for i, (n, start) in enumerate(zip(query_lens, starts)):
        slots += [int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK for p in range(start, start + n)]
    return torch.tensor(slots, dtype=torch.int64)


def _step(num_kv: int, group: int, hd: int, dtype: torch.dtype, query_lens, starts, seed=0):
    """A cache with random history and one step's q/k/v: every sequence owns 4 blocks."""
    gen = torch.Generator().manual_seed(seed)
    seqs, tokens = len(query_lens), sum(query_lens)
    cache = torch.randn(2, 4 * seqs + 1, BLOCK, num_kv, hd, generator=gen).to(dtype)
    tables = torch.randperm(4 * seqs, generator=gen).view(seqs, 4) + 1  # block 0 unused
    q = torch.randn(tokens, num_kv * group, hd, generator=gen).to(dtype)
    kv = torch.randn(tokens, 2 * num_kv, hd, generator=gen).to(dtype)
    k, v = kv.split(num_kv, dim=1)  # strided views, as the fused qkv projection gives them
    return cache, tables, q, k, v, AttnBatch(list(query_lens), list(starts), tables,
                                             _slots(tables, query_lens, starts))


@pytest.mark.parametrize("num_kv,group,hd", [(2, 3, 32), (1, 1, 16), (3, 4, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_step_matches_the_torch_reference(num_kv, group, hd, dtype):
    # a prompt's first chunk, a continued chunk, decode rows and a chunk crossing blocks
    query_lens, starts = [5, 1, 20, 1, 12], [0, 17, 3, 40, 30]
    cache, tables, q, k, v, batch = _step(num_kv, group, hd, dtype, query_lens, starts)
    ref_cache, cache = cache.clone(), cache.clone()
    NATIVE.write_kv(k, v, ref_cache, batch.slot_mapping)
    CudaOps().write_kv(k, v, cache, batch.slot_mapping)
    assert torch.equal(cache, ref_cache)
    scale = hd ** -0.5
    ref = NATIVE.paged_attention(q.float(), k.float(), v.float(), ref_cache.float(), batch, scale)
    out = CudaOps().paged_attention(q, k, v, cache, batch, scale)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_decode_rows_and_padding():
    """Decode alone (one launch, the head group padded to 16 rows); a padding row (slot -1,
    context 0) writes no key and reads none."""
    cache, tables, q, k, v, batch = _step(2, 3, 32, torch.float32, [1, 1, 1], [0, 15, 63])
    ref_cache, cache = cache.clone(), cache.clone()
    slots = batch.slot_mapping.clone()
    slots[1] = -1  # row 1 pads
    CudaOps().write_kv(k, v, cache, slots)
    NATIVE.write_kv(k[[0, 2]], v[[0, 2]], ref_cache, slots[[0, 2]])
    assert torch.equal(cache, ref_cache)
    real = AttnBatch([1, 1], [0, 63], tables[[0, 2]], slots[[0, 2]])
    ref = NATIVE.paged_decode(q[[0, 2]], ref_cache, real, 32 ** -0.5)
    padded = AttnBatch([1, 1, 1], [0, 0, 63], tables, slots,
                       _context_lens=torch.tensor([1, 0, 64]))
    out = CudaOps().paged_decode(q, cache, padded, 32 ** -0.5)
    torch.testing.assert_close(out[[0, 2]], ref, atol=2e-5, rtol=2e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_unsupported_block_size_falls_back_to_the_reference():
    attn_cache = torch.zeros(2, 8, 4, 1, 16)  # block size 4: below tl.dot's 16
    assert not kernels.supports(attn_cache)
    q, k, v = torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16)
    batch = AttnBatch([3], [0], torch.tensor([[1, 2]]), torch.tensor([4, 5, 6]))
    ref_cache = attn_cache.clone()
    out = CudaOps().paged_attention(q, k, v, _written(attn_cache, k, v, batch), batch, 0.25)
    ref = NATIVE.paged_attention(q, k, v, _written(ref_cache, k, v, batch), batch, 0.25)
    torch.testing.assert_close(out, ref)


def _written(cache, k, v, batch):
    CudaOps().write_kv(k, v, cache, batch.slot_mapping)
    return cache


CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 96,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 6,
          "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 256}


# Gemma 2: layer 0 attends over a window of 4 keys; scores and logits soft-capped
GEMMA = dict(CONFIG, architectures=["Gemma2ForCausalLM"], head_dim=16, sliding_window=4,
             query_pre_attn_scalar=16, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)


def _model(ops, config=CONFIG):
    torch.manual_seed(0)
    model = build_model(config, TrivialCommunicator(), torch.float32)
    for param in model.parameters():
        param.data.normal_(0, 0.2)
    use_ops(model, ops)
    kv_cache.allocate(model, 16, BLOCK, torch.float32, torch.device("cpu"))
    return model


def _tensor(values):
    return torch.tensor(values, dtype=torch.int64)


@pytest.mark.parametrize("config", [CONFIG, GEMMA], ids=["llama", "gemma2"])
def test_decode_graph_runner_matches_eager_steps(config):
    """A prompt step, then decode steps of 3 sequences through DecodeGraphs (padded to the
    bucket of 4, the buffers' fixed-width block tables), against the torch reference run
    eagerly; then a mixed step in one launch."""
    eager, cuda = _model(NATIVE, config), _model(CudaOps(), config)
    assert cuda.graph_safe
    graphs = DecodeGraphs(cuda, max_batch=6, max_blocks=8, device=torch.device("cpu"),
                          capture=False)
    assert graphs.sizes == [1, 2, 4, 6]
    prompts = [list(range(3, 10)), list(range(20, 37)), list(range(50, 53))]
    tables = _tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    lens = [len(p) for p in prompts]
    batch = AttnBatch(lens, [0, 0, 0], tables, _slots(tables, lens, [0, 0, 0]))
    ids = _tensor([t for p in prompts for t in p])
    positions = _tensor([i for p in prompts for i in range(len(p))])
    with torch.inference_mode():
        torch.testing.assert_close(cuda(ids, positions, batch), eager(ids, positions, batch),
                                   atol=1e-4, rtol=1e-4)
        for step in range(3):
            starts = [n + step for n in lens]
            batch = AttnBatch([1, 1, 1], starts, tables, _slots(tables, [1, 1, 1], starts))
            ids, positions = _tensor([60 + step, 61, 62 - step]), _tensor(starts)
            assert graphs.handles(batch)
            torch.testing.assert_close(graphs.run(ids, positions, batch),
                                       eager(ids, positions, batch), atol=1e-4, rtol=1e-4)
        # a mixed step: sequence 0 decodes, sequence 2 continues with a chunk of 5
        starts, query_lens = [lens[0] + 3, lens[2] + 3], [1, 5]
        tables = tables[[0, 2]]
        batch = AttnBatch(query_lens, starts, tables, _slots(tables, query_lens, starts))
        assert not graphs.handles(batch)
        ids = _tensor([70, 71, 72, 73, 74, 75])
        positions = _tensor([starts[0]] + list(range(starts[1], starts[1] + 5)))
        torch.testing.assert_close(cuda(ids, positions, batch), eager(ids, positions, batch),
                                   atol=1e-4, rtol=1e-4)


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert bucket_sizes(50) == [1, 2, 4, 8, 16, 24, 32, 48, 50]


CAPPED = [(4, None), (None, 2.0), (9, 3.0), (1, None)]


@pytest.mark.parametrize("window,softcap", CAPPED, ids=[f"w{w}-cap{c}" for w, c in CAPPED])
def test_sliding_window_and_softcap_match_the_torch_reference(window, softcap):
    """Gemma's attention in the triton kernel: windows shorter than a chunk and than a block
    (whole blocks before the window skipped), soft-capped scores; a mixed step and decode."""
    query_lens, starts = [5, 1, 20, 1, 12], [0, 17, 3, 40, 30]
    cache, tables, q, k, v, batch = _step(2, 3, 32, torch.float32, query_lens, starts, seed=4)
    _written(cache, k, v, batch)
    scale = 32 ** -0.5
    ref = NATIVE.paged_attention(q, k, v, cache, batch, scale, window, softcap)
    out = CudaOps().paged_attention(q, k, v, cache, batch, scale, window, softcap)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    decode = AttnBatch([1, 1, 1], [0, 15, 63], tables[:3], _slots(tables[:3], [1, 1, 1], [0, 15, 63]))
    ref = NATIVE.paged_decode(q[:3], cache, decode, scale, window, softcap)
    torch.testing.assert_close(CudaOps().paged_decode(q[:3], cache, decode, scale, window, softcap),
                               ref, atol=2e-5, rtol=2e-5)

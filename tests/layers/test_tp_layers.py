"""TP equivalence (Megatron pattern): each rank's output of a parallel layer equals the
matching slice, or the sum, of the unsharded layer's output, computed with plain torch and
Hugging Face modules. Ranks are real processes joined by real collectives."""

from __future__ import annotations

import multiprocessing as mp
import uuid

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from layers.partition import head_shard, padded_vocab_shard, split_range
from workers.comm import Rendezvous, find_free_port

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS, HEAD_DIM, TOKENS = 72, 97, 151, 9, 3, 8, 11
TP_SIZES = [1, 2, 3, 4]


def _full_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    return {
        "col.weight": rand(50, HIDDEN), "col.bias": rand(50),
        "row.weight": rand(HIDDEN, 50), "row.bias": rand(HIDDEN),
        "q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN), "q_proj.bias": rand(HEADS * HEAD_DIM),
        "k_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN), "k_proj.bias": rand(KV_HEADS * HEAD_DIM),
        "v_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN), "v_proj.bias": rand(KV_HEADS * HEAD_DIM),
        "o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
        "gate_proj.weight": rand(INTER, HIDDEN), "up_proj.weight": rand(INTER, HIDDEN),
        "down_proj.weight": rand(HIDDEN, INTER),
        "embed.weight": rand(VOCAB, HIDDEN), "norm.weight": 1 + rand(HIDDEN),
        "x": rand(TOKENS, HIDDEN), "x_row": rand(TOKENS, 50), "x_inter": rand(TOKENS, INTER),
        "ids": torch.randint(0, VOCAB, (TOKENS,), generator=g).float(),
    }


def _rank_main(rank, tp, backend, rdv, path, queue):
    """One TP rank: build every parallel layer, load its shard, run it, report outputs."""
    torch.set_num_threads(1)
    from safetensors import safe_open

    from layers.attention import AttnBatch
    from layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from layers.linear import ColumnParallelLinear, RowParallelLinear
    from layers.mlp import GatedMLP
    from layers.models.decoder import DecoderArgs, SelfAttention
    from layers.rotary import RopeSpec, RotaryEmbedding
    from workers.comm import create_communicator
    from workers.loader import LoadStats, TensorSource

    comm = create_communicator(backend, rank, tp, rdv, timeout_s=60)
    try:
        with safe_open(path, framework="pt") as f:
            def load(param, name, shard=None):
                param.weight_loader(param, TensorSource(name, f.get_slice(name), LoadStats()), shard)

            x, ids = f.get_tensor("x"), f.get_tensor("ids").long()
            out = {}
            col = ColumnParallelLinear.split(HIDDEN, 50, tp, rank, True, torch.float32)
            load(col.weight, "col.weight"), load(col.bias, "col.bias")
            out["column"] = col(x)
            row = RowParallelLinear.split(50, HIDDEN, True, torch.float32, comm)
            load(row.weight, "row.weight"), load(row.bias, "row.bias")
            start, size = split_range(50, tp, rank)
            out["row"] = row(f.get_tensor("x_row")[:, start:start + size])
            args = DecoderArgs("Qwen2ForCausalLM", VOCAB, HIDDEN, INTER, 1, HEADS, KV_HEADS,
                               HEAD_DIM, 1e-6, RopeSpec(), False, True, False, False, 128)
            attn = SelfAttention(args, head_shard(HEADS, KV_HEADS, tp, rank), torch.float32, comm,
                                 RotaryEmbedding(HEAD_DIM, args.rope))
            for shard in "qkv":
                for kind in ("weight", "bias"):
                    load(getattr(attn.qkv_proj, kind), f"{shard}_proj.{kind}", shard)
            load(attn.o_proj.weight, "o_proj.weight")
            out["qkv"] = attn.qkv_proj(x)
            out["attention"] = attn(x, torch.arange(TOKENS), AttnBatch([TOKENS], [0]))
            mlp = GatedMLP(HIDDEN, INTER, torch.float32, comm)
            load(mlp.gate_up_proj.weight, "gate_proj.weight", "gate")
            load(mlp.gate_up_proj.weight, "up_proj.weight", "up")
            load(mlp.down_proj.weight, "down_proj.weight")
            out["merged"] = mlp.gate_up_proj(x)
            out["mlp"] = mlp(x)
            down = mlp.down_proj
            out["down_alone"] = down(f.get_tensor("x_inter")[:, down.in_start:down.in_start + down.in_size])
            emb = VocabParallelEmbedding(VOCAB, HIDDEN, torch.float32, comm)
            load(emb.weight, "embed.weight")
            out["embedding"] = emb(ids)
            head = ParallelLMHead(VOCAB, HIDDEN, torch.float32, comm, tied_to=emb)
            out["lm_head"] = head(x)
            out["greedy"] = head.greedy(torch.cat([x, torch.zeros(2, HIDDEN)]))  # 2 all-tie rows
        queue.put((rank, {k: _to_numpy(v) for k, v in out.items()}))
    except Exception as exc:  # report instead of leaving the parent waiting
        queue.put((rank, repr(exc)))
    finally:
        comm.close()


def _to_numpy(value):
    # numpy arrays pickle by value; torch tensors would travel as shared-memory handles that
    # die with the exiting child process
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(t.numpy() for t in value)
    return value.numpy()


def _to_torch(value):
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(torch.from_numpy(a) for a in value)
    return torch.from_numpy(value)


def _run_ranks(tp: int, backend: str, path: str) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    rdv = Rendezvous("127.0.0.1", find_free_port("127.0.0.1"), f"test-layers-{uuid.uuid4().hex[:8]}")
    procs = [ctx.Process(target=_rank_main, args=(r, tp, backend, rdv, path, queue)) for r in range(tp)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    errors = {r: v for r, v in results.items() if isinstance(v, str)}
    assert not errors, errors
    return [{k: _to_torch(v) for k, v in results[r].items()} for r in range(tp)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    w = _full_weights()
    path = tmp_path_factory.mktemp("tp_layers") / "layers.safetensors"
    save_file(w, str(path))
    return w, str(path)


@pytest.fixture(scope="module", params=[(tp, "shm" if tp % 2 == 0 else "gloo") for tp in TP_SIZES],
                ids=lambda p: f"tp{p[0]}-{p[1]}")
def rank_outputs(request, weights):
    tp, backend = request.param
    return tp, _run_ranks(tp, backend, weights[1])


def test_column_parallel_rank_output_is_its_slice(weights, rank_outputs):
    w, _ = weights
    tp, outs = rank_outputs
    full = F.linear(w["x"], w["col.weight"], w["col.bias"])
    for rank, out in enumerate(outs):
        start, size = split_range(50, tp, rank)
        torch.testing.assert_close(out["column"], full[:, start:start + size], rtol=0, atol=1e-5)


def test_row_parallel_all_reduce_gives_the_full_output(weights, rank_outputs):
    w, _ = weights
    full = F.linear(w["x_row"], w["row.weight"], w["row.bias"])
    for out in rank_outputs[1]:
        torch.testing.assert_close(out["row"], full, rtol=0, atol=1e-5)
        torch.testing.assert_close(out["down_alone"], F.linear(w["x_inter"], w["down_proj.weight"]),
                                   rtol=0, atol=1e-5)


def test_qkv_parallel_holds_whole_kv_heads_and_their_query_heads(weights, rank_outputs):
    w, _ = weights
    tp, outs = rank_outputs
    full = {s: F.linear(w["x"], w[f"{s}_proj.weight"], w[f"{s}_proj.bias"]) for s in "qkv"}
    for rank, out in enumerate(outs):
        hs = head_shard(HEADS, KV_HEADS, tp, rank)
        q, k, v = out["qkv"]
        d = HEAD_DIM
        torch.testing.assert_close(q, full["q"][:, hs.q_start * d:(hs.q_start + hs.num_q) * d], rtol=0, atol=1e-5)
        torch.testing.assert_close(k, full["k"][:, hs.kv_start * d:(hs.kv_start + hs.num_kv) * d], rtol=0, atol=1e-5)
        torch.testing.assert_close(v, full["v"][:, hs.kv_start * d:(hs.kv_start + hs.num_kv) * d], rtol=0, atol=1e-5)


def test_merged_column_and_swiglu_mlp_match_transformers(weights, rank_outputs):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    w, _ = weights
    tp, outs = rank_outputs
    ref = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
                                num_key_value_heads=KV_HEADS))
    ref.load_state_dict({f"{n}.weight": w[f"{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")})
    with torch.no_grad():
        expected = ref(w["x"])
    gate, up = F.linear(w["x"], w["gate_proj.weight"]), F.linear(w["x"], w["up_proj.weight"])
    for rank, out in enumerate(outs):
        start, size = split_range(INTER, tp, rank)
        torch.testing.assert_close(out["merged"][0], gate[:, start:start + size], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["merged"][1], up[:, start:start + size], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["mlp"], expected, rtol=0, atol=1e-4)


def test_gqa_attention_matches_transformers(weights, rank_outputs):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding

    w, _ = weights
    config = Qwen2Config(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         head_dim=HEAD_DIM, attn_implementation="eager")
    ref = Qwen2Attention(config, layer_idx=0).eval()
    ref.load_state_dict({k: w[k] for k in ref.state_dict()})
    pos = torch.arange(TOKENS)[None]
    cos_sin = Qwen2RotaryEmbedding(config)(w["x"][None], pos)
    causal = torch.full((TOKENS, TOKENS), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected = ref(w["x"][None], cos_sin, causal)[0][0]
    for out in rank_outputs[1]:
        torch.testing.assert_close(out["attention"], expected, rtol=0, atol=1e-4)


def test_vocab_parallel_embedding_and_lm_head(weights, rank_outputs):
    w, _ = weights
    tp, outs = rank_outputs
    expected_emb = F.embedding(w["ids"].long(), w["embed.weight"])
    expected_logits = F.linear(w["x"], w["embed.weight"])
    for rank, out in enumerate(outs):
        torch.testing.assert_close(out["embedding"], expected_emb, rtol=0, atol=1e-5)
        if rank == 0:
            torch.testing.assert_close(out["lm_head"], expected_logits, rtol=0, atol=1e-5)
            # greedy without gathering logits: torch's argmax of the full logits, ties -> id 0
            assert out["greedy"].tolist() == expected_logits.argmax(dim=-1).tolist() + [0, 0]
        else:
            assert out["lm_head"] is None and out["greedy"] is None
    starts = [padded_vocab_shard(VOCAB, tp, r)[0] for r in range(tp)]
    assert starts == sorted(set(starts))  # disjoint slices cover the vocabulary in order

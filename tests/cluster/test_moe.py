"""Mixture-of-Experts through the engine: greedy generation equal to transformers
``generate`` in both expert layouts, and the expert-load metrics equal to the choices of
transformers' own router on the same tokens."""

from __future__ import annotations

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cluster import LLM, SamplingParams
from cluster.serving.metrics import EngineMetrics
from tests.checkpoints import write_tiny_checkpoint

PROMPTS = [[(5 * i + 7 * j) % 150 + 1 for j in range(n)] for i, n in enumerate([9, 3, 21, 14])]
NEW = 12


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Qwen2-MoE: layer 0 sparse (5 experts, 2 per token, a shared expert), layer 1 dense, so
    that layer 0 routes every token the engine computes (the last layer computes only the
    sampled rows of a prompt)."""
    return write_tiny_checkpoint("qwen2-moe", tmp_path_factory.mktemp("moe"), seed=3)


@pytest.fixture(scope="module")
def reference(moe):
    """transformers' greedy continuations, and the experts its router picks at layer 0 for
    the tokens the engine computes (each prompt and its continuation but the last token)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        moe, dtype=torch.float32, experts_implementation="eager").eval()
    outputs, counts = [], torch.zeros(5, dtype=torch.int64)
    with torch.no_grad():
        for p in PROMPTS:
            gen = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=NEW, do_sample=False, pad_token_id=0)
            outputs.append(gen[0, len(p):].tolist())
            router = model(gen[:, :-1], output_router_logits=True).router_logits[0]  # (tokens, 5)
            chosen = torch.softmax(router.float(), dim=-1).topk(2, dim=-1).indices
            counts += torch.bincount(chosen.reshape(-1), minlength=5)
    return outputs, counts.tolist()


# (tp, pp, expert parallel): at pp=2 the sparse layer is on the first stage, whose counts
# travel beside the last stage's tokens
LAYOUTS = [(2, 1, False), (2, 1, True), (1, 2, False), (2, 2, True)]


@pytest.mark.parametrize("tp,pp,ep", LAYOUTS,
                         ids=[f"tp{t}-pp{p}-{'ep' if e else 'experts-tp'}" for t, p, e in LAYOUTS])
def test_generation_and_expert_load_match_transformers(ray_session, moe, reference, tp, pp, ep):
    expected_tokens, expected_load = reference
    llm = LLM(dtype="float32", model=str(moe), tensor_parallel_size=tp, pipeline_parallel_size=pp,
              cpus_per_worker=0.5, block_size=4, kv_cache_bytes=1 << 22,
              enable_expert_parallel=ep, name=f"moe-tp{tp}-pp{pp}-{'ep' if ep else 'tp'}")
    try:
        out = llm.generate(prompt_token_ids=PROMPTS,
                           sampling_params=SamplingParams(max_tokens=NEW, temperature=0,
                                                          ignore_eos=True))
        assert [o.outputs[0].token_ids for o in out] == expected_tokens
        metrics = EngineMetrics("moe", "moe-test")
        metrics.observe_engine(llm.engine)
        families = {f.name: f for f in text_string_to_metric_families(metrics.text())}
    finally:
        llm.shutdown()
    routed = {(s.labels["layer"], int(s.labels["expert"])): s.value
              for s in families["shardlm:moe_expert_tokens"].samples if s.name.endswith("_total")}
    assert {layer for layer, _ in routed} == {"0"}  # layer 1 is dense
    assert [routed[("0", e)] for e in range(5)] == expected_load
    imbalance = families["shardlm:moe_expert_load_imbalance"].samples[0].value
    assert imbalance >= 1.0

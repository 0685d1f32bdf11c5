"""Every tensor of a step is created on the device it is used on (docs/ARCHITECTURE.md,
"Platforms"): the model runner's paths run with torch's default device set to ``meta``, so a
tensor made without an explicit device lands on ``meta``, and under a torch function mode
that fails any op whose tensor arguments sit on different devices. On a GPU the same
omission would put a CPU tensor next to CUDA ones. (Without the mode, some ops, such as
``index_select`` of a CPU tensor with a ``meta`` index, return garbage instead of failing;
the tokens are also compared with a run without ``meta``.) The ops are the device-generic
ones, the path a GPU worker runs."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from cluster.contract.messages import SamplerParams, SeqChunk, SeqParams, StepPlan
from layers.models import build_model
from layers.ops import NATIVE
from layers.platform import use_ops
from workers import kv_cache
from workers.comm import TrivialCommunicator
from workers.model_runner import ModelRunner

BLOCK = 4
CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 160, "hidden_size": 96,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 6,
          "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 256}
GREEDY, LOGPROBS, RANDOM = (SamplerParams(temperature=0.0), SamplerParams(temperature=0.0, logprobs=3),
                            SamplerParams(temperature=0.8, top_p=0.9, top_k=20, seed=5))


class OneDevicePerOp(TorchFunctionMode):
    """Fails an op whose tensor arguments are on different devices (a 0-dim CPU tensor may
    join any device, as torch allows)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                   and not (t.dim() == 0 and t.device.type == "cpu")}
        if len(devices) > 1:
            raise AssertionError(f"{getattr(func, '__name__', func)} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def _runner() -> ModelRunner:
    torch.manual_seed(0)
    model = build_model(CONFIG, TrivialCommunicator(), torch.float32)
    for param in model.parameters():
        param.data.normal_(0, 0.2)
    use_ops(model, NATIVE)
    kv_cache.allocate(model, 32, BLOCK, torch.float32, torch.device("cpu"))
    return ModelRunner(model, BLOCK, torch.device("cpu"), TrivialCommunicator(), TrivialCommunicator())


def _plans() -> list[StepPlan]:
    """Prefill, chunked prefill, mixed prefill/decode, decode, a prefix-cache hit (a prompt
    whose first two blocks are sequence 0's, computed from position 8), and a preempted
    sequence recomputed from scratch into new blocks."""
    p0, p1 = list(range(1, 12)), list(range(40, 47))
    return [
        _plan(1, [(SeqChunk(0, p0[:6], 0, [0, 1, 2], False), GREEDY),  # first chunk of 0
                  (SeqChunk(1, p1, 0, [3, 4], True), LOGPROBS)]),  # whole prompt of 1
        _plan(2, [(SeqChunk(0, p0[6:], 6, [0, 1, 2], True), GREEDY),  # continued prefill
                  (SeqChunk(1, [77], 7, [3, 4], True), LOGPROBS)]),  # decode beside it
        _plan(3, [(SeqChunk(0, [5], 11, [0, 1, 2], True), RANDOM),
                  (SeqChunk(1, [78], 8, [3, 4, 5], True), GREEDY)]),  # decode only
        _plan(4, [(SeqChunk(2, p0[8:] + [9], 8, [0, 1, 6], True), GREEDY),  # prefix hit
                  (SeqChunk(0, [6], 12, [0, 1, 2, 7], True), LOGPROBS)]),
        _plan(5, [(SeqChunk(1, p1 + [77, 78, 79], 0, [8, 9, 10], True), RANDOM)]),  # recompute
    ]


def _plan(step_id: int, chunks: list) -> StepPlan:
    """A plan whose chunks' sequences get these sampling parameters from now on."""
    return StepPlan(step_id, [c for c, _ in chunks],
                    [SeqParams(c.seq_id, 4, sampler) for c, sampler in chunks])


def _run(default_device: str | None) -> list:
    runner, out = _runner(), []
    if default_device:
        torch.set_default_device(default_device)
    try:
        with OneDevicePerOp():
            for plan in _plans():
                result = runner.execute(plan)
                out.append([(t.seq_id, t.token_id, t.logprob, t.top_logprobs) for t in result.tokens])
    finally:
        torch.set_default_device(None)
    return out


def test_meta_default_device_catches_a_tensor_made_without_one():
    """The check works: a tensor made without a device meets the model's CPU tensors."""
    runner = _runner()
    torch.set_default_device("meta")
    try:
        with OneDevicePerOp(), pytest.raises(AssertionError, match="mixes devices"):
            stray = torch.arange(4)  # as a forgetful step would build its positions
            runner.model.embed_tokens.weight.index_select(0, stray)
    finally:
        torch.set_default_device(None)


def test_every_step_path_keeps_to_the_model_device():
    expected = _run(None)
    assert sum(len(step) for step in expected) == 8
    assert _run("meta") == expected  # the same tokens and logprobs, nothing on the wrong device

"""The CPU path: the layers' ops through the C kernels of :mod:`layers.cpu.kernels`.

Chosen once per worker (:func:`layers.platform.select_ops`) for float32 on a CPU where the
kernels built. Each op runs its kernel; where a kernel declines a particular tensor (an
odd width, a weight that could not be packed), the op is the device-generic one of
:class:`layers.ops.TorchOps`, which this class extends. A GPU worker never reaches this
module.
"""

from __future__ import annotations

from torch import nn

from layers.cpu import kernels
from layers.cpu.decode_layer import DecodeLayer, DecodeStep
from layers.ops import TorchOps


class CpuOps(TorchOps):
    name = "cpu-kernels"

    def __init__(self, fused_layers: bool = True):
        self.fused_layers = fused_layers  # the two-call decode layer (tests compare both ways)
        self._layers: dict[int, DecodeLayer | None] = {}  # id(decoder layer) -> its kernel view

    def prepare(self, model: nn.Module) -> int:
        """Repack, in place, the weight of every module that multiplies through ``linear``
        (those with ``packable = True``) into the kernel's panel layout where the kernel
        applies (rows a multiple of 16, AVX2). A weight shared by two modules (tied
        embeddings) is packed once and serves both. Returns how many weights were packed."""
        done: set[int] = set()
        for module in model.modules():
            param = getattr(module, "weight", None) if getattr(module, "packable", False) else None
            if param is None or id(param) in done or param.dim() != 2:
                continue
            panels = kernels.pack_weight(param.data)
            if panels is not None:
                param.data = panels
                done.add(id(param))
        return len(done)

    def linear(self, x, weight, bias=None):
        # x: (rows, in); weight: (out, in), or packed (out / 16, in, 16) -> (rows, out)
        if weight.dim() == 2:
            return super().linear(x, weight, bias)
        y = kernels.packed_linear(x, weight)
        return y if bias is None else y + bias

    def embedding(self, index, weight):
        # weight: (rows, hidden) or packed (rows / P, hidden, P); index: (n,) -> (n, hidden)
        if weight.dim() == 2:
            return super().embedding(index, weight)
        panel = weight.shape[2]
        return weight[index // panel, :, index % panel]

    def rms_norm(self, x, weight, eps):
        out = kernels.rms_norm(x, weight, eps)
        return out if out is not None else super().rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        fused = kernels.add_rms_norm(x, residual, weight, eps)
        return fused if fused is not None else super().add_rms_norm(x, residual, weight, eps)

    def rotate_(self, heads, rotary, positions):
        if not kernels.rope_inplace(heads, *rotary.cos_sin(positions, full=False)):
            super().rotate_(heads, rotary, positions)

    def silu_mul(self, gate_up):
        out = kernels.silu_mul(gate_up)
        return out if out is not None else super().silu_mul(gate_up)

    def write_kv(self, k, v, cache, slots):
        if not kernels.write_kv(k, v, cache, slots):
            super().write_kv(k, v, cache, slots)

    def paged_decode(self, q, cache, batch, scale):
        # the kernel reads each sequence's blocks in place (no gather into a padded copy)
        out = kernels.paged_decode_attention(q, cache, batch.block_tables,
                                             batch.context_lens_tensor(), scale)
        return out if out is not None else super().paged_decode(q, cache, batch, scale)

    def attend(self, q, k, v, scale, causal_offset):
        if k.shape[0] == q.shape[0] + causal_offset:  # the causal case the kernel covers
            out = kernels.prefill_attention(q, k, v, scale)
            if out is not None:
                return out
        return super().attend(q, k, v, scale, causal_offset)

    # ---- a decode step's whole layer in two C calls ------------------------------------------
    def fused_decode(self, layer, x, positions, batch):
        """The layer for a step where every sequence decodes one token, in two C calls around
        the all-reduces (:class:`layers.cpu.decode_layer.DecodeLayer`; one rank: no
        all-reduce, the residual added in C): at small batches dispatching the ops one by one
        cost about a fifth of the step. None where the kernels decline, before anything was
        written."""
        kernel = self._kernel(layer) if self.fused_layers else None
        if kernel is None:
            return None
        if "decode_step" not in batch.platform_state:  # once per step, for every layer
            cos, sin = layer.self_attn.rotary.cos_sin(positions, full=False)
            batch.platform_state["decode_step"] = DecodeStep.make(
                cos, sin, batch.slot_mapping, batch.block_tables, batch.context_lens_tensor())
        step = batch.platform_state["decode_step"]
        partial = kernel.attention_half(x, step) if step else None
        if partial is None:
            return None
        comm = layer.mlp.down_proj.comm  # the layer's TP group (o_proj's too)
        alone = comm.world_size == 1
        attn_out = partial if alone else comm.all_reduce(partial)
        halves = kernel.mlp_half(attn_out, x, step, add_residual=alone)
        if halves is None:  # the attention half is done (keys written): finish op by op
            return layer.mlp_half(attn_out, x)
        out, h = halves
        return out if alone else h + comm.all_reduce(out)

    def _kernel(self, layer) -> DecodeLayer | None:
        """The layer as the two-call kernel takes it (packed weights, no biases, a KV cache),
        set up once per cache; None where it does not apply."""
        cache = layer.self_attn.attn.kv_cache
        if cache is None:
            return None
        key = id(layer)
        known = self._layers.get(key, False)
        if known is not False and (known is None or known.cache is cache):
            return known
        sa, mlp = layer.self_attn, layer.mlp
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        linears = (sa.qkv_proj, sa.o_proj, mlp.gate_up_proj, mlp.down_proj)
        kernel = None if any(m.bias is not None for m in linears) else DecodeLayer.make(
            n1.weight, n1.eps, sa.qkv_proj.weight, sa.num_q, sa.num_kv, sa.attn.scale, cache,
            sa.o_proj.weight, n2.weight, n2.eps, mlp.gate_up_proj.weight, mlp.down_proj.weight)
        self._layers[key] = kernel
        return kernel


def kernels_available() -> bool:
    """Whether the C kernels are on (``SHARDLM_CPU_KERNELS`` not 0) and built here."""
    return kernels.load() is not None


"""The CPU path: the layers' ops through the C kernels of :mod:`layers.cpu.kernels`.

Chosen once per worker (:func:`layers.platform.select_ops`) on a CPU where the kernels built.
The linear layers' weights are float32 (packed panels), bfloat16 or int8 with a scale per
output feature (``weights``); activations, norms and the KV cache stay float32 in every
format, so each op but the matmuls is the same float32 kernel. Each op runs its kernel; where a kernel declines a particular tensor (an
odd width, a weight that could not be packed), the op is the device-generic one of
:class:`layers.ops.TorchOps`, which this class extends. A GPU worker never reaches this
module.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from layers.attention import Attention
from layers.cpu import kernels
from layers.cpu.decode_layer import FMT_AMX, FMT_DP, DecodeLayer, DecodeStep, layer_kernel
from layers.cpu.flags import BF16_DOT_FLAGS, cpu_flags
from layers.cpu.weights import bf16_gemm, onednn_blocked, pad_rows, quantize_int8
from layers.ops import TorchOps


WEIGHT_FORMATS = ("float32", "bfloat16", "int8")

# Below a number of rows a bf16 matmul is the C kernel (bound by the weights' bytes), from it
# a tiled GEMM: on AMX our own kernel (amx_linear.c) from AMX_MIN_ROWS up to AMX_MAX_ROWS
# rows and torch's (oneDNN) past them; without AMX, from BF16_KERNEL_ROWS, oneDNN's bf16 GEMM
# on its blocked copy (AVX512-BF16). Measured on the default model's shapes
# (docs/ARCHITECTURE.md, "CPU precision"): the C kernel 1.5-3x ahead of oneDNN at 1-4 rows,
# level at 8; against the AMX kernel level at 4 rows and behind from 5 (a decode step at 5,
# 6 and 7 rows 3%, 3-6% and 8% faster on the tiles); from 8 to 768 rows the AMX kernel
# 1.1-2x ahead of oneDNN's blocked GEMM, behind it from about 1024 rows (prefill chunks).
# Without bf16 dot products in the CPU (no avx512_bf16 or amx_bf16: AVX2-only CPUs, older
# AVX-512 ones) torch's bf16 GEMM is emulated, orders of magnitude slower than widening in
# registers: there the C kernel takes every row count (NO_BF16_GEMM_ROWS).
BF16_KERNEL_ROWS = int(os.environ.get("SHARDLM_BF16_KERNEL_ROWS", "8"))
AMX_MIN_ROWS = int(os.environ.get("SHARDLM_AMX_MIN_ROWS", "5"))
AMX_MAX_ROWS = int(os.environ.get("SHARDLM_AMX_MAX_ROWS", "768"))
NO_BF16_GEMM_ROWS = 1 << 62
DP_PANEL = 32  # output features per panel of dpbf16_linear.c


class CpuOps(TorchOps):
    name = "cpu-kernels"

    def __init__(self, fused_layers: bool = True, weights: str = "float32",
                 kv_cache_dtype: torch.dtype = torch.float32, deterministic: bool = False):
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"CpuOps: weights {weights!r}: expected one of {WEIGHT_FORMATS}")
        if kv_cache_dtype not in kernels.KV_DTYPES:
            raise ValueError(f"CpuOps: KV cache {kv_cache_dtype}: expected float32 or bfloat16")
        self.kv_cache_dtype = kv_cache_dtype  # bf16: decode reads half the bytes per token
        # prompt attention in bf16 through torch's flash kernel where AMX runs it: 2-3x the
        # float32 C kernel at 128-512 tokens, fresh or continuing (docs/ARCHITECTURE.md)
        flags = cpu_flags()
        self.isa = kernels.kernel_isa()  # what the C kernels are built for (SHARDLM_CPU_ISA)
        # deterministic: one kernel per op at every row count, each row's sums in one order
        # (docs/ARCHITECTURE.md, "Deterministic mode")
        self.deterministic = deterministic
        if deterministic and kernels.load() is None:
            raise ValueError("model.deterministic: the CPU kernels did not build here (or "
                             "SHARDLM_CPU_KERNELS=0), and torch's own matmuls sum a row in an "
                             "order that depends on the rows beside it")
        self.bf16_prompt_attention = (kv_cache_dtype == torch.bfloat16 and "amx_bf16" in flags
                                      and not deterministic)
        self.native_bf16 = bool(flags & BF16_DOT_FLAGS)  # else torch's bf16 GEMM is emulated
        self.fused_layers = fused_layers  # the two-call decode layer (tests compare both ways)
        self.weights = weights
        self._layers: dict[int, DecodeLayer | None] = {}  # id(decoder layer) -> its kernel view
        self._scales: dict[int, torch.Tensor] = {}  # id(int8 weight) -> (out,) float32 scales
        self._blocked: dict[int, torch.Tensor] = {}  # id(bf16 weight) -> oneDNN's blocked copy
        self._amx: dict[int, torch.Tensor] = {}  # id(bf16 weight) -> its AMX tile-order copy
        self._dp: dict[int, torch.Tensor] = {}  # id(bf16 weight) -> dpbf16 copy (deterministic)
        self._padded: dict[tuple, object] = {}  # a weight -> its copy padded to whole panels
        if weights != "float32":
            self.name = f"cpu-kernels-{weights}"

    activation_dtype = torch.float32  # hidden states and norms in every format

    def prepare(self, model: nn.Module) -> int:
        """Repack, in place, the weight of every module that multiplies through ``linear``
        (those with ``packable = True``) into the kernel's panel layout where the kernel
        applies (rows a multiple of 16, AVX2). A weight shared by two modules (tied
        embeddings) is packed once and serves both. Returns how many weights were packed.

        With ``weights`` bfloat16 or int8, those weights are converted instead (int8: each
        output feature's largest magnitude maps to 127), a module's ``lowp_weights`` (experts)
        become bf16 and every other parameter (norms, biases, routers) float32."""
        if self.deterministic:
            self._check_attention(model)
        if self.weights != "float32":
            return self._convert(model)
        done: set[int] = set()
        for module in model.modules():  # a weight left unpacked: _padded_linear's, deterministic
            param = getattr(module, "weight", None) if getattr(module, "packable", False) else None
            if param is None or id(param) in done or param.dim() != 2:
                continue
            panels = kernels.pack_weight(param.data)
            if panels is not None:
                param.data = panels
                done.add(id(param))
        return len(done)

    @staticmethod
    def _check_attention(model: nn.Module) -> None:
        """Deterministic attention is the decode kernel's for every token: refuse, at load, a
        model whose heads it does not take (rather than fail its first step)."""
        for name, module in model.named_modules():
            if isinstance(module, Attention) and not kernels.decode_attention_fits(
                    module.num_q, module.num_kv, module.head_dim):
                raise ValueError(
                    f"model.deterministic: {name} has {module.num_q} query heads, "
                    f"{module.num_kv} KV heads of {module.head_dim} on this rank; the CPU "
                    f"attention kernel takes heads of a multiple of 16 up to 256, at most 16 "
                    f"query heads per KV head")

    def _stays_float32(self, weight: torch.Tensor) -> bool:
        """Deterministic mode keeps a matmul weight in float32 (the panel kernel's, padded:
        ``_padded_linear``) where its format's one kernel cannot take it, judged by the input
        width alone, which every tp rank of a column-parallel weight shares: bf16 on the
        dot-product kernel needs an even one (outputs are padded to its panels), the widening
        kernel (int8, bf16 without AVX512-BF16) a multiple of 16 (outputs padded to fours)."""
        if not self.deterministic:
            return False
        if self.weights == "bfloat16" and self.native_bf16 and kernels.dpbf16_available():
            return weight.shape[1] % 2 != 0
        return weight.shape[1] % 16 != 0  # outputs not in fours: _lowp pads them

    def _convert(self, model: nn.Module) -> int:
        matmul = {id(m.weight) for m in model.modules()  # a tied weight: packable in the head
                  if getattr(m, "packable", False) and getattr(m, "weight", None) is not None
                  and m.weight.dim() == 2 and not self._stays_float32(m.weight)}
        # weights multiplied through ``linear`` in slices (Mixture-of-Experts' experts): bf16
        lowp = {id(getattr(m, name)) for m in model.modules() for name in getattr(m, "lowp_weights", ())}
        for param in model.parameters():  # each shared parameter once
            if id(param) in lowp:
                param.data = param.data.to(torch.bfloat16)
            elif id(param) not in matmul:
                param.data = param.data.float()
            elif self.weights == "bfloat16":
                param.data = param.data.to(torch.bfloat16)
                self._tile_copy(param)
            else:
                param.data, self._scales[id(param)] = quantize_int8(param.data)
        if hasattr(model, "dtype"):
            model.dtype = self.activation_dtype  # what travels between pipeline stages
        return len(matmul)

    @property
    def lowp_rows(self) -> int:
        """Below this many rows a bf16 matmul is the C kernel: AMX_MIN_ROWS where the weights
        have AMX tile copies, BF16_KERNEL_ROWS where the CPU has bf16 dot products, else
        every row count (NO_BF16_GEMM_ROWS)."""
        if self.deterministic:
            return NO_BF16_GEMM_ROWS
        if self._amx:
            return AMX_MIN_ROWS
        return BF16_KERNEL_ROWS if self.native_bf16 else NO_BF16_GEMM_ROWS

    def _tile_copy(self, param) -> None:
        """The copy of a bf16 weight the GEMM of rows >= lowp_rows reads: AMX's tile
        order where AMX runs, else oneDNN's blocked layout (where this torch has one and the
        CPU has bf16 dot products; elsewhere no GEMM reads a copy)."""
        if self.deterministic:  # one kernel at every row count: the dot products' where the
            # CPU has them (on a copy padded to whole panels, so that a tp slice of any size
            # gets it), else widening
            dp = kernels.dpbf16_pack(pad_rows(param.data, DP_PANEL))
            if dp is not None:
                self._dp[id(param)] = dp
            return
        packed = kernels.amx_pack(param.data)
        if packed is not None:
            self._amx[id(param)] = packed
            return
        blocked = onednn_blocked(param.data) if self.native_bf16 else None
        if blocked is not None:
            self._blocked[id(param)] = blocked

    def bf16_matmul(self, x, weight, out_dtype=torch.float32):
        # x: (rows, in) float32 or bf16; weight: (out, in) bf16 -> (rows, out) of out_dtype
        # (float32 sums, rounded once for bf16)
        rows = x.shape[0]
        dp = self._dp.get(id(weight))
        if dp is not None and x.dtype == torch.float32:  # deterministic, AVX512-BF16
            y = kernels.dpbf16_linear(x, dp)
            if y is not None:
                return y[:, :weight.shape[0]].to(out_dtype)
        if rows < self.lowp_rows and x.dtype == torch.float32:
            y = self._lowp(x, weight)
            if y is not None:
                return y.to(out_dtype)
            self._undetermined("bf16 linear", x, weight)
        packed = self._amx.get(id(weight))
        if packed is not None and rows <= AMX_MAX_ROWS:
            y = kernels.amx_linear(x, packed, out_dtype)
            if y is not None:
                return y
        return bf16_gemm(x, weight, self._blocked.get(id(weight))).to(out_dtype)

    def linear(self, x, weight, bias=None, out_dtype=None):
        # x: (rows, in) float32 (bf16 after swiglu and attention_dtype); weight: (out, in)
        # float32, bf16 or int8, or packed float32 panels (out / 16, in, 16) -> (rows, out)
        # float32, or of out_dtype (bf16 weights, no bias: the GEMM's own rounding)
        if weight.dtype == torch.bfloat16 and bias is None:  # rounded once, in the GEMM
            return self.bf16_matmul(x, weight, out_dtype or torch.float32)
        if weight.dtype == torch.bfloat16:
            y = self.bf16_matmul(x, weight)
        elif weight.dtype == torch.int8:
            scales = self._scales[id(weight)]
            y = self._lowp(x, weight, scales)
            if y is None:
                self._undetermined("int8 linear", x, weight)
                y = torch.nn.functional.linear(x, weight.float() * scales[:, None])
        elif weight.dim() == 2 and self.deterministic:
            y = self._padded_linear(x, weight)
        elif weight.dim() == 2:
            return super().linear(x, weight, bias, out_dtype)
        else:
            y = kernels.packed_linear(x, weight, self.deterministic)
        y = y if bias is None else y + bias
        return y if out_dtype is None else y.to(out_dtype)

    def _lowp(self, x, weight, scales=None):
        """lowp_linear; in deterministic mode a weight whose outputs are not in fours (a tp
        slice of an odd vocabulary) or whose inputs are not in sixteens (a small expert's
        features) on a copy padded with zeros to both, the input padded likewise, so that
        every slice of a weight, at any tp, goes through this kernel (the zero products add
        nothing). x: (rows, in) -> (rows, out) or None"""
        out, width = weight.shape
        if not (self.deterministic and (out % 4 or width % 16)):
            return kernels.lowp_linear(x, weight, scales)
        padded, padded_scales = self._padded_copy(weight, lambda: (
            torch.nn.functional.pad(pad_rows(weight, 4), (0, -width % 16)),
            None if scales is None else torch.cat([scales, scales.new_ones(-out % 4)])))
        y = kernels.lowp_linear(torch.nn.functional.pad(x, (0, -width % 16)), padded,
                                padded_scales)
        return None if y is None else y[:, :out]

    def _padded_linear(self, x, weight):
        """A float32 matmul of a weight not packed at load (a router's few outputs, an
        expert's slice of the experts' tensor), in deterministic mode: through the panel
        kernel on a packed copy, padded with zero outputs to whole panels.
        x: (rows, in); weight: (out, in) -> (rows, out)"""
        panels = self._padded_copy(weight, lambda: kernels.pack_weight(
            pad_rows(weight, kernels.PANEL).clone()))  # packed in place: never the weight itself
        if panels is None:
            self._undetermined("float32 linear", x, weight)
        return kernels.packed_linear(x.float(), panels, exact=True)[:, :weight.shape[0]]

    def _padded_copy(self, weight, make):
        """The copy ``make()`` gives of ``weight``, made once (keyed by its memory and shape:
        an expert's slice is a new view on every call)."""
        key = (weight.data_ptr(), tuple(weight.shape))
        if key not in self._padded:
            self._padded[key] = make()
        return self._padded[key]

    def attention_dtype(self, attn, batch):
        """bf16 on a step with prompt chunks where prompt attention runs in bf16 (AMX) and the
        q/k/v projection is a bf16 GEMM without bias or per-head norms. Attention reads q, k
        and v in bf16 and the cache keeps k and v in bf16 anyway: carried in float32 they only
        cost conversions, about a tenth of a prompt step on the default model. Past
        AMX_MAX_ROWS the GEMM rounds its output to bf16 itself and the values are the same;
        below it q and k are rounded once more, before rotation, and a decoding sequence's
        query in such a step is rounded to bf16 before the float32 decode kernel reads it."""
        qkv = attn.qkv_proj
        if (self.bf16_prompt_attention and batch.max_query_len > 1 and not attn.qk_norm
                and qkv.weight.dtype == torch.bfloat16 and qkv.bias is None):
            return torch.bfloat16
        return None

    def swiglu(self, gate_up, x):
        # x: (rows, hidden) float32 -> (rows, inter): bf16 from a tiled GEMM (bf16 weights,
        # rows >= lowp_rows), which the down projection's GEMM reads as it is; else float32
        weight = gate_up.weight
        if (weight.dtype != torch.bfloat16 or gate_up.bias is not None
                or x.shape[0] < self.lowp_rows):
            return super().swiglu(gate_up, x)
        return self.silu_mul(self.bf16_matmul(x, weight, torch.bfloat16))  # (rows, 2 * inter) bf16

    def embedding(self, index, weight):
        # weight: (rows, hidden) float32, bf16 or int8, or packed (rows / P, hidden, P);
        # index: (n,) -> (n, hidden) float32 for the low-precision formats
        if weight.dtype == torch.bfloat16:
            return weight[index].float()
        if weight.dtype == torch.int8:
            return weight[index].float() * self._scales[id(weight)][index, None]
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

    def row_max(self, x):
        # x: (rows, n) float32 (a padded vocabulary slice: not contiguous) -> (best, first index)
        found = kernels.argmax_rows(x.contiguous())
        return found if found is not None else super().row_max(x)

    def gumbel_argmax(self, x, seeds, positions, temps):
        return kernels.gumbel_argmax_rows(x, seeds, positions, temps)

    def silu_mul(self, gate_up):
        return self._activation("silu_mul", gate_up)

    def gelu_tanh_mul(self, gate_up):
        return self._activation("gelu_tanh_mul", gate_up)

    def sigmoid(self, x):
        return self._activation("sigmoid", x)

    def _activation(self, name: str, x):
        """The C kernel ``name`` (layers.cpu.kernels), else torch's (outside deterministic mode)."""
        out = getattr(kernels, name)(x)
        if out is None:
            self._undetermined(name, x)
            return getattr(super(), name)(x)
        return out

    def write_kv(self, k, v, cache, slots):
        if not kernels.write_kv(k, v, cache, slots):
            super().write_kv(k, v, cache, slots)

    def paged_attention(self, q, k, v, cache, batch, scale, window=None, softcap=None):
        # deterministic: every new token attends as a decoding one does (the decode kernel,
        # its context up to its own position, keys and values read back from the cache), so
        # a token's attention is the same in a prompt chunk of any length, beside anything,
        # and when a replay recomputes it (q: (tokens, num_q, hd) -> the same shape)
        if not self.deterministic or batch.max_query_len == 1:
            return super().paged_attention(q, k, v, cache, batch, scale, window, softcap)
        if "token_rows" not in batch.platform_state:  # once per step, for every layer
            batch.platform_state["token_rows"] = batch.token_rows()
        return self.paged_decode(q, cache, batch.platform_state["token_rows"], scale, window,
                                 softcap)

    def paged_decode(self, q, cache, batch, scale, window=None, softcap=None):
        # the kernel reads each sequence's blocks in place (no gather into a padded copy);
        # q: float32, or bf16 (attention_dtype) read as float32 -> out in q's dtype
        q32 = q.float()
        out = kernels.paged_decode_attention(q32, cache, batch.block_tables,
                                             batch.context_lens_tensor(), scale, window, softcap)
        if out is None:
            self._undetermined("decode attention", q, cache)
            out = super().paged_decode(q32, cache, batch, scale, window, softcap)
        return out.to(q.dtype)

    def _undetermined(self, op: str, x, weight=None) -> None:
        """Deterministic mode never falls back to torch's kernels, whose sums (and whose
        activations' last bits) depend on the rows beside a row: a kernel declining is an
        error naming the op."""
        if self.deterministic:
            with_weight = "" if weight is None else f" with {tuple(weight.shape)} {weight.dtype}"
            raise RuntimeError(f"model.deterministic: the CPU kernel for {op} declined input "
                               f"{tuple(x.shape)} {x.dtype}{with_weight}; torch's kernel would "
                               f"not be batch-invariant")

    def attend(self, q, k, v, scale, causal_offset, window=None, softcap=None):
        # q: (n, num_q, hd) float32 or bf16 (attention_dtype); k, v: (ctx, num_kv, hd)
        # float32, or bf16 (attention_dtype, or read from the cache) -> in q's dtype
        if self.bf16_prompt_attention:
            bf16 = torch.bfloat16
            return super().attend(q.to(bf16), k.to(bf16), v.to(bf16), scale, causal_offset,
                                  window, softcap).to(q.dtype)
        if k.dtype != q.dtype:  # keys and values read back from a bf16 cache
            k, v = k.to(q.dtype), v.to(q.dtype)
        if k.shape[0] == q.shape[0] + causal_offset:  # the causal case the kernel covers
            out = kernels.prefill_attention(q, k, v, scale, window, softcap)
            if out is not None:
                return out
        return super().attend(q, k, v, scale, causal_offset, window, softcap)

    # ---- a decode step's whole layer in two C calls ------------------------------------------
    def fused_decode(self, layer, x, positions, batch):
        """The layer for a step where every sequence decodes one token, in two C calls around
        the all-reduces (:class:`layers.cpu.decode_layer.DecodeLayer`; one rank: no
        all-reduce, the residual added in C): at small batches dispatching the ops one by one
        cost about a fifth of the step. None where the kernels decline, before anything was
        written."""
        kernel = self._kernel(layer) if self.fused_layers else None
        if kernel is None or not kernel.applies(x.shape[0]):
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
        """The layer as the two-call kernel takes it, set up once per cache; None where it
        does not apply."""
        cache = layer.self_attn.attn.kv_cache
        if cache is None:
            return None
        known = self._layers.get(id(layer), False)
        if known is not False and (known is None or known.cache is cache):
            return known
        copies = self._dp if self.deterministic else self._amx
        rows = (0, NO_BF16_GEMM_ROWS) if self._dp else (self.lowp_rows, AMX_MAX_ROWS)
        kernel = self._layers[id(layer)] = layer_kernel(
            layer, cache, self._scales, copies, rows, self.deterministic,
            FMT_DP if self._dp else FMT_AMX)
        return kernel


def kernels_available() -> bool:
    """Whether the C kernels are on (``SHARDLM_CPU_KERNELS`` not 0) and built here."""
    return kernels.load() is not None


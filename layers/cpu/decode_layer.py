"""A decode step's decoder layer in two C calls around the all-reduces
(``layers/cpu/csrc/decode_layer.c``, built with the other kernels by ``layers.cpu.kernels``);
:meth:`layers.cpu.ops.CpuOps.fused_decode` runs a layer through it.

At batch 1 a layer's arithmetic takes about 0.6 ms; checking a dozen tensors per call from
Python cost a noticeable share of that. So the arguments are checked once: a layer's weights
and cache when the kernel is set up (``DecodeLayer``), a step's positions and block tables
once per step for all layers (``DecodeStep``); a call then checks only its hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layers.cpu.kernels import KV_DTYPES, LOWP_FORMATS, PANEL, check_slots, i64_rows, float32_kernels, load

FMT_AMX = 3  # decode_layer.c: bf16 weights in AMX's tile order (amx_linear.c)
FMT_DP = 4  # decode_layer.c: bf16 weights packed for AVX512-BF16 (dpbf16_linear.c)


class DecodeStep:
    """A decode step's arguments shared by every layer: rotary cos/sin (rows, hd / 2), the
    cache slots of the new tokens and the context lengths (rows,), block tables
    (rows, max_blocks); the tensors are held so that their memory stays put."""

    def __init__(self, cos, sin, slots, block_tables, context_lens):
        self.rows, self.half_hd = cos.shape
        self.tensors = (cos, sin, slots, block_tables, context_lens)
        self.max_blocks = block_tables.shape[1]

    @classmethod
    def make(cls, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
             block_tables: torch.Tensor, context_lens: torch.Tensor) -> "DecodeStep | None":
        """None where the kernels do not apply."""
        if load() is None or cos.dim() != 2 or sin.shape != cos.shape or block_tables.dim() != 2:
            return None
        rows = cos.shape[0]
        if not (float32_kernels(cos, sin) and all(i64_rows(t, rows) for t in (slots, block_tables, context_lens))
                and slots.dim() == 1 and context_lens.dim() == 1):
            return None
        return cls(cos, sin, slots, block_tables, context_lens)


@dataclass
class DecodeLayer:
    """A decoder layer's weights and KV cache as ``decode_layer.c`` takes them (packed
    float32 panels, or bf16 / int8 matrices; no biases), checked once; ``make`` answers None
    where the kernel does not apply.

    cache: (2, num_blocks, block_size, num_kv, hd) float32 or bf16; qkv panels: ((num_q + 2 num_kv) hd / 16,
    hidden, 16); o: (hidden / 16, num_q hd, 16); gate_up: (2 inter / 16, hidden, 16);
    down: (hidden / 16, inter, 16); or each (out, in) in bf16 or int8, with ``scales`` the
    int8 weights' (out,) float32 scales in that order; norms: (hidden,)."""

    input_norm: torch.Tensor
    input_eps: float
    qkv: torch.Tensor
    num_q: int
    num_kv: int
    hd: int
    scale: float
    cache: torch.Tensor
    num_blocks: int
    block_size: int
    o: torch.Tensor
    post_norm: torch.Tensor
    post_eps: float
    gate_up: torch.Tensor
    down: torch.Tensor
    hidden: int
    inter: int
    format: int = 0  # 0 packed float32 panels, 1 bf16, 2 int8 (lowp_linear.c)
    scales: tuple = (None, None, None, None)  # int8: qkv, o, gate_up, down scales
    # bf16: the four weights' copies in AMX's tile order (amx_pack), which the steps of
    # ``tile_rows`` = (first, last) rows multiply with (decode_layer.c's format 3); None: no AMX
    tiles: tuple | None = None
    tile_rows: tuple[int, int] = (8, 768)
    tile_format: int = FMT_AMX  # or FMT_DP: ``tiles`` packed by dpbf16_pack (deterministic)
    exact: bool = False  # float32: a row's sums in one order at every row count (deterministic)

    @classmethod
    def make(cls, input_norm: torch.Tensor, input_eps: float, qkv: torch.Tensor, num_q: int,
             num_kv: int, scale: float, cache: torch.Tensor, o: torch.Tensor,
             post_norm: torch.Tensor, post_eps: float, gate_up: torch.Tensor,
             down: torch.Tensor, scales: tuple | None = None, tiles: tuple | None = None,
             tile_rows: tuple[int, int] = (8, 768), exact: bool = False,
             tile_format: int = FMT_AMX) -> "DecodeLayer | None":
        weights = (qkv, o, gate_up, down)
        if (float32_kernels(input_norm, post_norm) is None or cache.dim() != 5
                or cache.dtype not in KV_DTYPES or not cache.is_contiguous()):
            return None
        fmt = LOWP_FORMATS.get(qkv.dtype, 0)
        hidden = input_norm.shape[0]
        _, num_blocks, block_size, kv_heads, hd = cache.shape
        width = (num_q + 2 * num_kv) * hd
        inter = gate_up.shape[0] // 2 if fmt else gate_up.shape[0] * PANEL // 2
        if fmt:  # natural (out, in) matrices of one format, int8 with a scale vector each
            shapes = [(width, hidden), (hidden, num_q * hd), (2 * inter, hidden), (hidden, inter)]
            scales = tuple(scales or (None,) * 4)
            formats_ok = (all(w.dtype == qkv.dtype and w.is_contiguous() for w in weights)
                          and all((s is not None) == (fmt == 2) for s in scales)
                          and (fmt == 1 or float32_kernels(*scales) is not None))
        else:
            shapes = [(width // PANEL, hidden, PANEL), (hidden // PANEL, num_q * hd, PANEL),
                      (2 * inter // PANEL, hidden, PANEL), (hidden // PANEL, inter, PANEL)]
            scales, formats_ok = (None,) * 4, float32_kernels(*weights) is not None
        shapes_ok = (input_norm.shape == post_norm.shape == (hidden,) and kv_heads == num_kv
                     and width % PANEL == 0
                     and all(tuple(w.shape) == shape for w, shape in zip(weights, shapes)))
        if not (shapes_ok and formats_ok):
            return None
        if fmt != 1 or tiles is None or not all(
                t is not None and t.shape == w.shape and t.dtype == torch.bfloat16
                for t, w in zip(tiles, weights)):
            tiles = None
        return cls(input_norm=input_norm, input_eps=input_eps, qkv=qkv, num_q=num_q, num_kv=num_kv,
                   hd=hd, scale=scale, cache=cache, num_blocks=num_blocks, block_size=block_size,
                   o=o, post_norm=post_norm, post_eps=post_eps, gate_up=gate_up, down=down,
                   hidden=hidden, inter=inter, format=fmt, scales=scales,
                   tiles=tuple(tiles) if tiles is not None else None, tile_rows=tile_rows,
                   exact=exact, tile_format=tile_format)

    def applies(self, rows: int) -> bool:
        """Whether a step of ``rows`` runs here: bf16 weights from ``tile_rows[0]`` rows on
        only with their AMX copies and up to ``tile_rows[1]`` (widening bf16 in registers is
        the small batches' kernel; past the tiles' range, oneDNN's GEMM op by op)."""
        first, last = self.tile_rows
        return (self.format != 1 or rows < first
                or (self.tiles is not None and rows <= last))

    def _weights(self, rows: int) -> tuple[int, tuple]:
        """The format and the (qkv, o, gate_up, down) matrices a step of ``rows`` reads."""
        if self.tiles is not None and rows >= self.tile_rows[0]:
            return self.tile_format, self.tiles
        return self.format, (self.qkv, self.o, self.gate_up, self.down)

    def _scale(self, i: int) -> int:
        return 0 if self.scales[i] is None else self.scales[i].data_ptr()

    def _fits(self, step: DecodeStep, *xs: torch.Tensor) -> bool:
        return (step.half_hd * 2 == self.hd and all(
            x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
            and x.shape == (step.rows, self.hidden) for x in xs))

    def attention_half(self, x: torch.Tensor, step: DecodeStep) -> torch.Tensor | None:
        """o_proj(paged attention(rotary(qkv(rms_norm(x))))) for one new token per sequence,
        writing the new keys and values into the cache; None (nothing written) where the
        kernel does not apply. Before tensor parallelism's all-reduce: this rank's partial sum.

        x: (seqs, hidden) -> (seqs, hidden)"""
        if not (self._fits(step, x) and self.applies(step.rows)):
            return None
        cos, sin, slots, tables, lens = step.tensors
        fmt, (qkv, o, _, _) = self._weights(step.rows)
        out = x.new_empty(step.rows, self.hidden)
        rc = load().decode_attention_half(
            x.data_ptr(), step.rows, self.hidden, self.input_norm.data_ptr(), self.input_eps,
            qkv.data_ptr(), self._scale(0), self.num_q, self.num_kv, self.hd, cos.data_ptr(),
            sin.data_ptr(), self.cache.data_ptr(), slots.data_ptr(), self.num_blocks,
            self.block_size, tables.data_ptr(), step.max_blocks, lens.data_ptr(), self.scale,
            o.data_ptr(), self._scale(1), out.data_ptr(), fmt,
            int(self.cache.dtype == torch.bfloat16), torch.get_num_threads(), int(self.exact))
        check_slots(rc, self.num_blocks * self.block_size)
        return out if rc == 0 else None

    def mlp_half(self, attn: torch.Tensor, x: torch.Tensor, step: DecodeStep, add_residual: bool
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(down(silu(gate) * up of rms_norm(attn + x)), attn + x), or with ``add_residual``
        (the layer's output, the sum of both, attn + x); None where the kernel does not apply.
        Without ``add_residual``, the first is before tensor parallelism's all-reduce.

        attn, x: (rows, hidden) -> both (rows, hidden)"""
        if not (self._fits(step, attn, x) and self.applies(step.rows)):
            return None
        fmt, (_, _, gate_up, down) = self._weights(step.rows)
        h, out = torch.empty_like(x), torch.empty_like(x)
        rc = load().decode_mlp_half(
            attn.data_ptr(), x.data_ptr(), step.rows, self.hidden, self.post_norm.data_ptr(),
            self.post_eps, gate_up.data_ptr(), self._scale(2), self.inter, down.data_ptr(),
            self._scale(3), h.data_ptr(), out.data_ptr(), int(add_residual), fmt,
            torch.get_num_threads(), int(self.exact))
        return (out, h) if rc == 0 else None


def layer_kernel(layer, cache: torch.Tensor, scales: dict, copies: dict, rows: tuple[int, int],
                 deterministic: bool, tile_format: int) -> DecodeLayer | None:
    """A decoder layer as the two-call kernel takes it (packed weights, no biases, a KV
    cache), for ``CpuOps``: ``scales`` its int8 weights' scales, ``copies`` the bf16
    weights' tile copies of ``tile_format`` (id of the weight -> copy) that steps of
    ``rows`` = (first, last) rows read. None where it does not apply: biases, row-parallel
    layers that gather their inputs (no partial sums to all-reduce), and in deterministic
    mode a layer whose matmuls would not all run the op-by-op path's kernels (some with a
    copy and some without, or copies padded past the weight)."""
    sa, mlp = layer.self_attn, layer.mlp
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
    linears = (sa.qkv_proj, sa.o_proj, mlp.gate_up_proj, mlp.down_proj)
    tiles = tuple(copies.get(id(m.weight)) for m in linears)
    mixed = deterministic and (
        any(t is None for t in tiles) and any(t is not None for t in tiles)
        or any(t is not None and t.shape != m.weight.shape for t, m in zip(tiles, linears)))
    if mixed or sa.o_proj.gathers or mlp.down_proj.gathers or any(
            m.bias is not None for m in linears):
        return None
    return DecodeLayer.make(
        n1.weight, n1.eps, sa.qkv_proj.weight, sa.num_q, sa.num_kv, sa.attn.scale, cache,
        sa.o_proj.weight, n2.weight, n2.eps, mlp.gate_up_proj.weight, mlp.down_proj.weight,
        tuple(scales.get(id(m.weight)) for m in linears), tiles, rows, deterministic,
        tile_format)

"""Two corrections to triton's interpreter, applied only under ``TRITON_INTERPRET=1`` (how
the CPU test suite and ``gpu-check --device cpu`` run the CUDA kernels). Both concern
``tl.dot``, which the interpreter hands to numpy's matmul:

- the interpreter keeps bfloat16 tensors as their raw 16-bit patterns, and numpy multiplies
  those patterns as integers (triton 3.x): every bf16 dot product comes out wrong. A bf16
  operand is widened to float32 here first (bf16 is float32's upper half).
- numpy's matmul goes to a BLAS whose microkernels round a row's sums differently
  depending on where the row sits in the tile (a row in the tile's remainder is summed by
  another kernel), so a kernel whose tiles are fixed would still look batch-variant. A GPU's
  matrix instructions compute each output from its own row and column alone; so does the
  dot here: each output is its products summed over k in order, in the accumulator's dtype.

The kernels themselves are unchanged; what a compiled kernel does on a GPU is checked by
``make gpu-check``.
"""

from __future__ import annotations

import numpy as np


def fix_dots() -> None:
    from triton import language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "fixed", False):
        return
    create_dot = builder.create_dot

    def widened(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def dot_in_k_order(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = widened(a), widened(b)
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:  # fp8: as triton does
            return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        acc_type = d.data.dtype
        x, y = a.data.astype(acc_type), b.data.astype(acc_type)
        acc = np.array(d.data, dtype=acc_type, copy=True)  # (..., M, N)
        for k in range(x.shape[-1]):
            acc += x[..., :, k, None] * y[..., None, k, :]
        return interpreter.TensorHandle(acc, d.dtype.scalar)

    dot_in_k_order.fixed = True
    builder.create_dot = dot_in_k_order

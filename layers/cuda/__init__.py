"""The CUDA platform: triton kernels for the paged KV cache (attention over the block
table, fused KV append), chosen by :func:`layers.platform.select_ops` on CUDA workers
where triton imports. Every other op is torch's own kernel (cuBLAS, fused SDPA); in
deterministic mode the matmuls and norms are triton kernels too (:mod:`layers.cuda.invariant`).
Under ``TRITON_INTERPRET=1`` the interpreter's ``tl.dot`` is corrected first
(:mod:`layers.cuda.interpreter`)."""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from layers.cuda.interpreter import fix_dots

    fix_dots()

"""The CUDA platform: triton kernels for the paged KV cache (attention over the block
table, fused KV append), chosen by :func:`layers.platform.select_ops` on CUDA workers
where triton imports. Every other op is torch's own kernel (cuBLAS, fused SDPA)."""

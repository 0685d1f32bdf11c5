"""The CPU path: :class:`layers.cpu.ops.CpuOps` over C kernels (``csrc/``) compiled on first
use on the machine that runs them. Only CPU workers import it (``layers.platform``)."""

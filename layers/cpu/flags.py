"""This CPU's feature flags, read once, and the instruction set the C kernels are built for:
what the platform and the CPU ops choose by.

``SHARDLM_CPU_ISA`` picks the kernels' instruction set: ``native`` (the default: everything
this CPU has) or ``avx2`` (x86-64-v3: AVX2 and FMA, no AVX-512, VNNI or AMX), which runs, on
a CPU with AVX-512, what a CPU with AVX2 alone runs. Under ``avx2`` the flags this module
reports lose what that CPU would not have, so every choice made by the flags (``dtype:
auto``, the bf16 GEMM's row ranges, prompt attention in bf16) is the AVX2 machine's too.
torch's own kernels are not affected (``ATEN_CPU_CAPABILITY=avx2`` and
``ONEDNN_MAX_CPU_ISA=AVX2`` restrict those).
"""

from __future__ import annotations

import os
from functools import lru_cache

# the compiler's flags for each instruction set the kernels can be built for
ISAS = {"native": ("-march=native",), "avx2": ("-march=x86-64-v3", "-mtune=native")}
# flags the avx2 build never uses: dropped from cpu_flags() under SHARDLM_CPU_ISA=avx2
_BEYOND_AVX2 = ("avx512", "amx", "avx_vnni", "avx_ifma", "avx_ne_convert")
# the CPU multiplies bf16 itself (else torch's bf16 GEMM is an emulation)
BF16_DOT_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def _proc_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as info:
            line = next((l for l in info if l.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def kernel_isa() -> str:
    """The instruction set the C kernels are built for (``SHARDLM_CPU_ISA``, default native);
    a clear error for a name it does not know or an ISA this CPU lacks."""
    isa = _requested_isa()
    if isa not in ISAS:
        raise ValueError(f"SHARDLM_CPU_ISA={isa!r}: expected one of {', '.join(ISAS)}")
    if isa == "avx2" and not {"avx2", "fma"} <= _proc_flags():
        raise ValueError("SHARDLM_CPU_ISA=avx2: this CPU has no AVX2 and FMA "
                         f"(flags: {' '.join(sorted(_proc_flags())) or 'unreadable'})")
    return isa


def cpu_flags() -> frozenset[str]:
    """The flags of ``/proc/cpuinfo`` (``avx512_bf16``, ``amx_bf16``, ...) that the kernels
    may use, empty where they cannot be read; under ``SHARDLM_CPU_ISA=avx2`` without those
    past AVX2."""
    flags = _proc_flags()
    if forced_avx2():
        return frozenset(f for f in flags if not f.startswith(_BEYOND_AVX2))
    return flags


def forced_avx2() -> bool:
    """Whether ``SHARDLM_CPU_ISA=avx2`` stands for an AVX2-only CPU here."""
    return _requested_isa() == "avx2"


def _requested_isa() -> str:
    return os.environ.get("SHARDLM_CPU_ISA") or "native"


def avx2_is_forcible() -> bool:
    """Whether this CPU has more than AVX2 and can also build and run the AVX2-only kernels
    (an x86 CPU with AVX2 and FMA and AVX-512): the tests then run both."""
    return {"avx2", "fma", "avx512f"} <= _proc_flags()

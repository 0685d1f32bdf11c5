"""This CPU's feature flags, read once: what the platform and the CPU ops choose by."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The flags of ``/proc/cpuinfo`` (``avx512_bf16``, ``amx_bf16``, ...), empty where they
    cannot be read."""
    try:
        with open("/proc/cpuinfo") as info:
            line = next((l for l in info if l.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())

"""Native CPU kernels, compiled on first use on the machine that runs them.

``paged_decode_attention`` (``layers/csrc/paged_decode.c``) reads each decoding sequence's
keys and values in place through its block table, where the PyTorch path has to gather
them into a padded batch first (on a batch-64 decode step of the default model that gather
and the attention over it took over half the step). The C file is compiled with the
system's C compiler (``$CC``, default ``cc``) for this CPU (``-O3 -march=native -fopenmp``)
into ``$SHARDLM_HOME/kernels`` (default ``~/.cache/shardlm/kernels``), keyed by a hash of
the source, the flags and the CPU, so nodes with other CPUs build their own. OpenMP comes
from the ``libgomp.so.1`` torch already loaded, so the kernel shares torch's thread pool.

Where there is no compiler or the build fails, ``load()`` returns None (with one warning)
and attention uses the PyTorch path; ``SHARDLM_CPU_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("shardlm.kernels")

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
_I64, _F32P, _I64P = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p


def kernel_dir() -> Path:
    from cluster.model_store import shardlm_home

    return shardlm_home() / "kernels"


def _cpu_signature() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((l for l in info.splitlines() if l.startswith(("flags", "Features"))), info[:4096])
    except OSError:
        return platform.processor()


def build(source: Path = SOURCE, out_dir: Path | None = None) -> Path:
    """Compile ``source`` into a shared library (once per source, flags and CPU); its path."""
    compiler = os.environ.get("CC", "cc")
    if not shutil.which(compiler):
        raise RuntimeError(f"no C compiler {compiler!r} on PATH")
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    out_dir = out_dir or kernel_dir()
    target = out_dir / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # other workers may build at once
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(source), "-o", tmp, "-lm"],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed on {source.name}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: readers see a whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they are turned off or cannot be built."""
    if os.environ.get("SHARDLM_CPU_KERNELS", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as exc:
        log.warning("CPU kernels unavailable, attention uses the PyTorch path: %s", exc)
        return None
    fn = lib.paged_decode_attention
    fn.argtypes = [_F32P, _F32P, _I64P, _I64P, _F32P, *[_I64] * 7, ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Decode attention through the C kernel; None where it does not apply (then use torch).

    q: (seqs, num_q, hd) float32; cache: (2, blocks, block_size, num_kv, hd) float32;
    block_tables: (seqs, max_blocks) int64; context_lens: (seqs,) int64 -> (seqs, num_q, hd)
    """
    lib = load()
    if lib is None or q.device.type != "cpu" or q.dtype != torch.float32 or cache.dtype != torch.float32:
        return None
    q, tables, lens = q.contiguous(), block_tables.contiguous(), context_lens.contiguous()
    if not cache.is_contiguous() or tables.dtype != torch.int64 or lens.dtype != torch.int64:
        return None
    seqs, num_q, hd = q.shape
    _, num_blocks, block_size, num_kv, _ = cache.shape
    out = torch.empty_like(q)
    rc = lib.paged_decode_attention(
        q.data_ptr(), cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
        seqs, num_q, num_kv, hd, num_blocks, block_size, tables.shape[1], scale,
        torch.get_num_threads())
    return out if rc == 0 else None

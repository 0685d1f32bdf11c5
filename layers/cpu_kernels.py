"""Native CPU kernels, compiled on first use on the machine that runs them.

``skinny_linear`` (``layers/csrc/skinny_linear.c``) multiplies a few rows by a weight
matrix while streaming the weight once: batch-1 decode is a pass over all the weights.
``paged_decode_attention`` (``layers/csrc/paged_decode.c``) reads each decoding sequence's
keys and values in place through its block table, where the PyTorch path has to gather
them into a padded batch first (on a batch-64 decode step of the default model that gather
and the attention over it took over half the step). The C files are compiled with the
system's C compiler (``$CC``, default ``cc``) for this CPU (``-O3 -march=native -fopenmp``)
into ``$SHARDLM_HOME/kernels`` (default ``~/.cache/shardlm/kernels``), keyed by a hash of
the sources, the flags and the CPU, so nodes with other CPUs build their own. OpenMP comes
from the ``libgomp.so.1`` torch already loaded, so the kernels share torch's thread pool.

Where there is no compiler or the build fails, ``load()`` returns None (with one warning)
and the layers use their PyTorch path; ``SHARDLM_CPU_KERNELS=0`` turns the kernels off.
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

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("paged_decode.c", "skinny_linear.c")]
SKINNY_MAX_ROWS = 8  # skinny_linear handles x of 1..8 rows (MAX_ROWS in the C file)
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


def build(sources: list[Path] = SOURCES, out_dir: Path | None = None) -> Path:
    """Compile ``sources`` into one shared library (once per sources, flags and CPU); its path."""
    compiler = os.environ.get("CC", "cc")
    if not shutil.which(compiler):
        raise RuntimeError(f"no C compiler {compiler!r} on PATH")
    text = b"".join(source.read_bytes() for source in sources)
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    out_dir = out_dir or kernel_dir()
    target = out_dir / f"shardlm-kernels-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # other workers may build at once
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, *map(str, sources), "-o", tmp, "-lm"],
                              capture_output=True, text=True)
        if done.returncode:
            names = ", ".join(source.name for source in sources)
            raise RuntimeError(f"{compiler} failed on {names}: {done.stderr.strip()[-2000:]}")
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
    fn = lib.skinny_linear
    fn.argtypes = [_F32P, _F32P, _F32P, _I64, _I64, _I64, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x @ weight.T`` for x of at most ``SKINNY_MAX_ROWS`` rows through the C kernel, which
    streams the weight at close to memory bandwidth (MKL's GEMV reached about 40% here);
    None where it does not apply.

    x: (rows, in) float32; weight: (out, in) float32 -> (rows, out)
    """
    if (x.dim() != 2 or not 1 <= x.shape[0] <= SKINNY_MAX_ROWS or x.device.type != "cpu"
            or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not weight.is_contiguous() or x.shape[1] % 8):
        return None
    lib = load()
    if lib is None:
        return None
    x = x.contiguous()
    y = x.new_empty(x.shape[0], weight.shape[0])
    rc = lib.skinny_linear(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0],
                           x.shape[1], weight.shape[0], torch.get_num_threads())
    return y if rc == 0 else None


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

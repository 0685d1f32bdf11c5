"""Native CPU kernels, compiled on first use on the machine that runs them.

``pack_weight`` / ``packed_linear`` (``layers/csrc/packed_linear.c``) are every linear
layer's matmul: weights are repacked once after loading into 16-column panels, and a
register-blocked AVX2 kernel streams each panel in memory order. Batch-1 decode (a pass
over all the weights) runs at close to memory bandwidth, where MKL's GEMV reached about
half; at 16-128 rows (batched decode) it ran 1.3-1.6x MKL's sgemm here, and at prefill
sizes about level with it or better.
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

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("paged_decode.c", "packed_linear.c")]
PANEL = 16  # output features per packed panel (NR in packed_linear.c)
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
    fn = lib.pack_weight
    fn.argtypes = [_F32P, _F32P, _I64, _I64]
    fn.restype = ctypes.c_int
    fn = lib.packed_linear
    fn.argtypes = [_F32P, _F32P, _F32P, _I64, _I64, _I64, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` in the panel layout of ``packed_linear``; None where the kernel does not
    apply (no kernels, not a float32 CPU matrix, rows not a multiple of ``PANEL``, no AVX2).

    weight: (out, in) -> panels (out / PANEL, in, PANEL), panels[j, k, c] = weight[PANEL*j + c, k]
    """
    lib = load()
    if (lib is None or weight.dim() != 2 or weight.device.type != "cpu"
            or weight.dtype != torch.float32 or weight.shape[0] % PANEL):
        return None
    out, width = weight.shape
    weight = weight.contiguous()
    panels = weight.new_empty(out // PANEL, width, PANEL)
    return panels if lib.pack_weight(weight.data_ptr(), panels.data_ptr(), out, width) == 0 else None


def packed_linear(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a weight packed by ``pack_weight``.

    x: (rows, in) float32; panels: (out / PANEL, in, PANEL) -> (rows, out)
    """
    count, width, _ = panels.shape
    if x.dim() != 2 or x.shape[1] != width or x.dtype != torch.float32:
        raise ValueError(f"packed_linear: input {tuple(x.shape)} {x.dtype} does not match a packed "
                         f"float32 weight of {width} input features")
    x = x.contiguous()
    y = x.new_empty(x.shape[0], count * PANEL)
    if x.shape[0]:
        rc = load().packed_linear(x.data_ptr(), panels.data_ptr(), y.data_ptr(), x.shape[0], width,
                                  count * PANEL, torch.get_num_threads())
        assert rc == 0, "packed_linear declined a weight that pack_weight packed"
    return y


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

"""Native CPU kernels, compiled on first use on the machine that runs them.

``pack_weight`` / ``packed_linear`` (``layers/cpu/csrc/packed_linear.c``) are every linear
layer's matmul: weights are repacked once after loading into 16-column panels, and a
register-blocked AVX2 kernel streams each panel in memory order. Batch-1 decode (a pass
over all the weights) runs at close to memory bandwidth, where MKL's GEMV reached about
half; at 16-128 rows (batched decode) it ran 1.3-1.6x MKL's sgemm here, and at prefill
sizes about level with it or better.
``lowp_linear`` (``lowp_linear.c``) is the matmul of bf16 weights and of int8 weights with a
scale per output feature, widened in registers against float32 activations (int8 through
VNNI's ``vpdpwssd`` on 14-bit activations), bound by the weights' bytes at small batches.
``dpbf16_pack`` / ``dpbf16_linear`` (``dpbf16_linear.c``) multiply bf16 weights, repacked once,
by activations rounded to bf16 on AVX512-BF16's dot products, each row's sums made in the same
order whatever the batch and the number of threads (deterministic mode).
``paged_decode_attention`` (``layers/cpu/csrc/paged_decode.c``, float32 or bf16 caches) reads each decoding sequence's
keys and values in place through its block table, where the PyTorch path has to gather
them into a padded batch first (on a batch-64 decode step of the default model that gather
and the attention over it took over half the step); ``prefill_attention``
(``prefill_attention.c``) is the causal case for new chunks. ``fused_ops.c`` holds a layer's
small ops (rms_norm, residual add + rms_norm, rotary in place, KV-cache write, silu * up),
one call each, and ``decode_layer.c`` a decode step's whole layer in two calls around the
all-reduces (``layers.cpu.decode_layer``). The C files are compiled with the
system's C compiler (``$CC``, default ``cc``) for this CPU (``-O3 -march=native -fopenmp``;
``SHARDLM_CPU_ISA=avx2`` builds for AVX2 and FMA alone instead, ``layers.cpu.flags``) into
``$SHARDLM_HOME/kernels`` (default ``~/.cache/shardlm/kernels``), keyed by a hash of the
sources and headers, the flags and the CPU, so nodes with other CPUs build their own. Each
kernel picks its code when it is compiled, by the instruction set it is compiled for
(AVX-512, AVX2 + FMA, or portable vectors). OpenMP comes
from the ``libgomp.so.1`` torch already loaded, so the kernels share torch's thread pool.

Where there is no compiler or the build fails, ``load()`` returns None (with one warning)
and the worker runs the device-generic path (``layers.ops``); ``SHARDLM_CPU_KERNELS=0``
turns the kernels off. Which path a worker runs is chosen once (``layers.platform``).
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

from layers.cpu.flags import ISAS, kernel_isa

log = logging.getLogger("shardlm.kernels")

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in (
    "paged_decode.c", "amx_linear.c", "dpbf16_linear.c", "packed_linear.c", "lowp_linear.c", "fused_ops.c",
    "prefill_attention.c", "decode_layer.c")]
HEADERS = [CSRC / name for name in ("vec.h", "microkernel.h", "kernels.h")]  # included by the sources: part of the cache key
PANEL = 16  # output features per packed panel (NR in packed_linear.c)
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]  # and the ISA's (flags.ISAS)
_I64, _F32P, _I64P = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p


def kernel_dir() -> Path:
    """Where built libraries are kept: ``$SHARDLM_HOME/kernels`` (the local store's root,
    default ``~/.cache/shardlm``)."""
    return Path(os.environ.get("SHARDLM_HOME") or "~/.cache/shardlm").expanduser() / "kernels"


def _cpu_signature() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((l for l in info.splitlines() if l.startswith(("flags", "Features"))), info[:4096])
    except OSError:
        return platform.processor()


def build(sources: list[Path] = SOURCES, out_dir: Path | None = None,
          headers: list[Path] = HEADERS, isa: str = "native") -> Path:
    """Compile ``sources`` for the instruction set ``isa`` (``layers.cpu.flags.ISAS``) into
    one shared library (once per sources, headers, flags and CPU); its path."""
    compiler = os.environ.get("CC", "cc")
    if not shutil.which(compiler):
        raise RuntimeError(f"no C compiler {compiler!r} on PATH")
    flags = [*FLAGS, *ISAS[isa]]
    text = b"".join(path.read_bytes() for path in [*sources, *headers])
    key = hashlib.sha256(text + " ".join(flags).encode() + _cpu_signature().encode()).hexdigest()[:16]
    out_dir = out_dir or kernel_dir()
    target = out_dir / f"shardlm-kernels-{isa}-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # other workers may build at once
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, *map(str, sources), "-o", tmp, "-lm"],
                              capture_output=True, text=True)
        if done.returncode:
            names = ", ".join(source.name for source in sources)
            raise RuntimeError(f"{compiler} failed on {names}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: readers see a whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_UNCHOSEN = object()
_chosen = _UNCHOSEN  # the library load() returns, chosen from the environment once


def load() -> ctypes.CDLL | None:
    """The compiled kernels for the instruction set of ``SHARDLM_CPU_ISA`` (default: this
    CPU's own), or None where they are turned off (``SHARDLM_CPU_KERNELS=0``) or cannot be
    built. Every op's wrapper calls it: the environment is read on the first call only
    (:func:`reselect` reads it again)."""
    return reselect() if _chosen is _UNCHOSEN else _chosen


def reselect() -> ctypes.CDLL | None:
    """Choose the library :func:`load` returns from the environment as it is now (a test
    that changes ``SHARDLM_CPU_KERNELS`` or ``SHARDLM_CPU_ISA`` calls it after)."""
    global _chosen
    _chosen = None if os.environ.get("SHARDLM_CPU_KERNELS", "1") == "0" else _load(kernel_isa())
    return _chosen


@lru_cache(maxsize=None)
def _load(isa: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(build(isa=isa)))
    except (RuntimeError, OSError) as exc:
        log.warning("CPU kernels unavailable, the layers use PyTorch: %s", exc)
        return None
    _INT, _F32 = ctypes.c_int, ctypes.c_float
    signatures = {
        "paged_decode_attention": [_F32P, _F32P, _I64P, _I64P, _F32P, *[_I64] * 7, _F32, _INT, _INT,
                                   _I64, _F32],
        "amx_linear_available": [],
        "argmax_rows": [_F32P, _I64, _I64, _F32P, _I64P, _INT],
        "gumbel_argmax_rows": [_F32P, _I64, _I64, _I64P, _I64P, _F32P, _I64P, _INT],
        "amx_pack_bf16": [_F32P, _F32P, _I64, _I64],
        "amx_linear": [_F32P, _INT, _F32P, _F32P, _INT, _I64, _I64, _I64, _INT],
        "dpbf16_available": [],
        "dpbf16_pack": [_F32P, _F32P, _I64, _I64],
        "dpbf16_linear": [_F32P, _F32P, _F32P, _I64, _I64, _I64, _INT],
        "pack_weight": [_F32P, _F32P, _I64, _I64],
        "packed_linear": [_F32P, _F32P, _F32P, _I64, _I64, _I64, _INT, _INT],
        "lowp_linear": [_F32P, _F32P, _F32P, _F32P, _I64, _I64, _I64, _INT, _INT],
        "rms_norm": [_F32P, _F32P, _F32P, _I64, _I64, _F32, _INT],
        "add_rms_norm": [_F32P, _F32P, _F32P, _F32P, _F32P, _I64, _I64, _F32, _INT],
        "rope_inplace": [_F32P, _I64, _I64, _I64, _I64, _F32P, _F32P, _INT],
        "rope_inplace_bf16": [_F32P, _I64, _I64, _I64, _I64, _F32P, _F32P, _INT],
        "write_kv": [_F32P, _F32P, _I64, _F32P, _I64P, _I64, _I64, _I64, _INT],
        "write_kv_bf16": [_F32P, _F32P, _I64, _F32P, _I64P, _I64, _I64, _I64],
        "silu_mul": [_F32P, _F32P, _I64, _I64, _INT],
        "silu_mul_bf16": [_F32P, _F32P, _I64, _I64, _INT],
        "gelu_tanh_mul": [_F32P, _F32P, _I64, _I64, _INT],
        "gelu_tanh_mul_bf16": [_F32P, _F32P, _I64, _I64, _INT],
        "sigmoid_rows": [_F32P, _F32P, _I64],
        "prefill_attention": [_F32P, _I64, _F32P, _F32P, _I64, _F32P, _I64, *[_I64] * 5, _F32, _INT,
                              _I64, _F32],
        "decode_attention_half": [_F32P, _I64, _I64, _F32P, _F32, _F32P, _F32P, _I64, _I64, _I64,
                                  _F32P, _F32P, _F32P, _I64P, _I64, _I64, _I64P, _I64, _I64P, _F32,
                                  _F32P, _F32P, _F32P, _INT, _INT, _INT, _INT],
        "decode_mlp_half": [_F32P, _F32P, _I64, _I64, _F32P, _F32, _F32P, _F32P, _I64, _F32P, _F32P,
                            _F32P, _F32P, _INT, _INT, _INT, _INT],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, _INT
    return lib


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """Repack ``weight`` in place into the panel layout of ``packed_linear`` and return it
    viewed as panels (the same storage: no second copy of the model); None, leaving it
    untouched, where the kernel does not apply (no kernels, not a contiguous float32 CPU
    matrix, rows not a multiple of ``PANEL``, no AVX2).

    weight: (out, in) -> panels (out / PANEL, in, PANEL), panels[j, k, c] = weight[PANEL*j + c, k]
    """
    lib = load()
    if (lib is None or weight.dim() != 2 or weight.device.type != "cpu"
            or weight.dtype != torch.float32 or weight.shape[0] % PANEL or not weight.is_contiguous()):
        return None
    out, width = weight.shape
    rc = lib.pack_weight(weight.data_ptr(), weight.data_ptr(), out, width)
    if rc == -2:
        raise MemoryError("pack_weight: could not allocate one panel of scratch")
    return weight.view(out // PANEL, width, PANEL) if rc == 0 else None


def packed_linear(x: torch.Tensor, panels: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """``x @ weight.T`` for a weight packed by ``pack_weight``; ``exact``: each row summed in
    the one order a row among others is (a lone row otherwise takes a faster order).

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
                                  count * PANEL, torch.get_num_threads(), int(exact))
        assert rc == 0, "packed_linear declined a weight that pack_weight packed"
    return y


LOWP_FORMATS = {torch.bfloat16: 1, torch.int8: 2}  # FMT_BF16, FMT_INT8 in lowp_linear.c
KV_DTYPES = (torch.float32, torch.bfloat16)  # the KV caches the kernels read and write


def lowp_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None
                ) -> torch.Tensor | None:
    """``x @ weight.T`` for a bf16 weight, or an int8 weight times ``scales`` per output
    feature, widened in registers against float32 activations; None where the kernel does
    not apply (neither AVX-512 nor AVX2, widths not multiples of 16 and 4).

    x: (rows, in) float32; weight: (out, in) bf16 or int8; scales: (out,) float32 -> (rows, out)
    """
    lib = load()
    fmt = LOWP_FORMATS.get(weight.dtype)
    if (lib is None or fmt is None or x.dim() != 2 or weight.dim() != 2 or x.dtype != torch.float32
            or x.device.type != "cpu" or x.shape[1] != weight.shape[1] or not weight.is_contiguous()
            or (fmt == 2) != (scales is not None)):
        return None
    x = x.contiguous()
    y = x.new_empty(x.shape[0], weight.shape[0])
    if not x.shape[0]:
        return y
    rc = lib.lowp_linear(x.data_ptr(), weight.data_ptr(), 0 if scales is None else scales.data_ptr(),
                         y.data_ptr(), x.shape[0], x.shape[1], weight.shape[0], fmt,
                         torch.get_num_threads())
    return y if rc == 0 else None


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor | None:
    """Decode attention through the C kernel; None where it does not apply (then use torch).
    ``window``: each new token sees its sequence's last ``window`` positions; ``softcap``:
    scores soft-capped (``softcap * tanh(score / softcap)``) before the softmax.

    q: (seqs, num_q, hd) float32; cache: (2, blocks, block_size, num_kv, hd) float32 or bf16;
    block_tables: (seqs, max_blocks) int64; context_lens: (seqs,) int64 -> (seqs, num_q, hd)
    """
    lib = load()
    if (lib is None or q.device.type != "cpu" or q.dtype != torch.float32
            or cache.dtype not in KV_DTYPES):
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
        int(cache.dtype == torch.bfloat16), torch.get_num_threads(), int(window or 0),
        float(softcap or 0.0))
    return out if rc == 0 else None


def decode_attention_fits(num_q: int, num_kv: int, hd: int) -> bool:
    """Whether paged_decode.c takes heads of this shape (its checks, made before a step)."""
    return 0 < num_kv <= 64 and num_q % num_kv == 0 and num_q // num_kv <= 16 and hd <= 256 \
        and hd % 16 == 0


def amx_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """A copy of the bf16 weight (out, in) in AMX's tile order for :func:`amx_linear`; None
    where AMX cannot run it (no AMX or no permission, out or in not a multiple of 32)."""
    return _bf16_copy(weight, "amx_linear_available", "amx_pack_bf16")


def _bf16_copy(weight: torch.Tensor, available: str, pack: str) -> torch.Tensor | None:
    """A bf16 CPU weight (out, in) repacked by the library's ``pack`` into a tensor of its
    shape, where ``available`` says the kernel runs here; None where not, or where ``pack``
    declines the shape."""
    lib = load()
    if (lib is None or weight.dtype != torch.bfloat16 or weight.dim() != 2
            or weight.device.type != "cpu" or not getattr(lib, available)()):
        return None
    weight = weight.contiguous()
    packed = torch.empty_like(weight)
    if getattr(lib, pack)(weight.data_ptr(), packed.data_ptr(), *weight.shape) != 0:
        return None
    return packed


def amx_linear(x: torch.Tensor, packed: torch.Tensor, out_dtype: torch.dtype = torch.float32
               ) -> torch.Tensor | None:
    """x (rows, in) float32 or bf16 @ W^T on AMX tiles, W packed by :func:`amx_pack`
    -> (rows, out) of ``out_dtype`` (float32 or bf16); None where the kernel declines."""
    lib = load()
    if lib is None or x.dtype not in KV_DTYPES or x.dim() != 2 or out_dtype not in KV_DTYPES:
        return None
    x = x.contiguous()
    n, k = packed.shape
    if x.shape[1] != k:
        raise ValueError(f"amx_linear: x has {x.shape[1]} features, the weight {k}")
    y = torch.empty(x.shape[0], n, dtype=out_dtype)
    rc = lib.amx_linear(x.data_ptr(), int(x.dtype == torch.bfloat16), packed.data_ptr(),
                        y.data_ptr(), int(out_dtype == torch.bfloat16), x.shape[0], n, k,
                        torch.get_num_threads())
    return y if rc == 0 else None


def dpbf16_available() -> bool:
    """Whether the kernels here have AVX512-BF16's dot products (dpbf16_linear.c)."""
    lib = load()
    return lib is not None and bool(lib.dpbf16_available())


def dpbf16_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """A copy of the bf16 weight in the panels :func:`dpbf16_linear` streams; None where the
    kernel cannot run (no AVX512-BF16, out not a multiple of 32 or in not even, not bf16).

    weight: (out, in) bf16 -> (out, in) bf16 holding panels (out / 32, in / 2, 32, 2),
    panels[p, i, c, j] = weight[32 p + c, 2 i + j]"""
    return _bf16_copy(weight, "dpbf16_available", "dpbf16_pack")


def dpbf16_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int | None = None
                  ) -> torch.Tensor | None:
    """x rounded to bf16 @ W^T, float32 sums of AVX512-BF16 dot products, W packed by
    :func:`dpbf16_pack`; each row's result has the same bits whatever the other rows of the
    call and the number of threads (deterministic mode). None where the kernel declines.

    x: (rows, in) float32; packed: (out, in) bf16 -> (rows, out) float32 (``out_features``,
    where given, must be out)"""
    lib = load()
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu":
        return None
    n, k = packed.shape
    if x.shape[1] != k or (out_features is not None and out_features != n):
        raise ValueError(f"dpbf16_linear: x {tuple(x.shape)} does not match a packed weight of "
                         f"{n} x {k}" + (f" ({out_features} outputs asked)" if out_features else ""))
    x = x.contiguous()
    y = x.new_empty(x.shape[0], n)
    if not x.shape[0]:
        return y if lib.dpbf16_available() else None
    rc = lib.dpbf16_linear(x.data_ptr(), packed.data_ptr(), y.data_ptr(), x.shape[0], n, k,
                           torch.get_num_threads())
    if rc == -2:
        raise MemoryError("dpbf16_linear: could not allocate the bf16 copy of x")
    return y if rc == 0 else None


# ---- the small per-layer ops (layers/cpu/csrc/fused_ops.c) ----------------------------------------
def float32_kernels(*tensors: torch.Tensor):
    """The kernels where every tensor is a contiguous float32 CPU tensor, else None."""
    if all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return load()
    return None


def _rows_of_heads(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """(rows, heads, hd) of ``dtype`` on a CPU with heads contiguous within a row (rows may
    be any stride apart, e.g. slices of the fused qkv output)."""
    return (t.dim() == 3 and t.device.type == "cpu" and t.dtype == dtype
            and t.stride(2) == 1 and t.stride(1) == t.shape[2])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x / rms(x) * weight per row; None where the kernel does not apply.

    x: (rows, hidden); weight: (hidden,) -> (rows, hidden)"""
    lib = float32_kernels(x, weight)
    if lib is None or x.dim() != 2:
        return None
    out = torch.empty_like(x)
    rc = lib.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps,
                      torch.get_num_threads())
    return out if rc == 0 else None


def add_rms_norm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rms_norm(a + b), a + b) in one pass; None where the kernel does not apply.

    a, b: (rows, hidden); weight: (hidden,) -> both (rows, hidden)"""
    lib = float32_kernels(a, b, weight)
    if lib is None or a.dim() != 2 or a.shape != b.shape:
        return None
    total, out = torch.empty_like(a), torch.empty_like(a)
    rc = lib.add_rms_norm(a.data_ptr(), b.data_ptr(), weight.data_ptr(), total.data_ptr(),
                          out.data_ptr(), a.shape[0], a.shape[1], eps, torch.get_num_threads())
    return (out, total) if rc == 0 else None


def rope_inplace(heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate every head of every token in place (Llama's half-rotation); False where the
    kernel does not apply (the caller rotates with torch).

    heads: (tokens, n, hd) float32 or bf16 (rotated in float32, rounded once), rows any
    stride apart, heads contiguous within a row (a slice of the fused qkv output); cos, sin:
    (tokens, hd / 2)"""
    lib = float32_kernels(cos, sin)
    tokens, n, hd = heads.shape
    if (lib is None or heads.dtype not in KV_DTYPES or not _rows_of_heads(heads, heads.dtype)
            or cos.shape != (tokens, hd // 2)):
        return False
    rotate = lib.rope_inplace_bf16 if heads.dtype == torch.bfloat16 else lib.rope_inplace
    return rotate(heads.data_ptr(), heads.stride(0), tokens, n, hd, cos.data_ptr(),
                  sin.data_ptr(), torch.get_num_threads()) == 0


def write_kv(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> bool:
    """cache[0][slots[t]] = k[t], cache[1][slots[t]] = v[t]; False where the kernel does not
    apply. Slots out of range raise.

    k, v: (tokens, num_kv, hd) float32, or bf16 into a bf16 cache, rows the same stride
    apart, each row contiguous; cache: (2, blocks, block_size, num_kv, hd) float32, or bf16
    (float32 keys and values rounded to nearest even); slots: (tokens,) int64"""
    lib = load() if cache.device.type == "cpu" and cache.dtype in KV_DTYPES and cache.is_contiguous() else None
    tokens, num_kv, hd = k.shape
    source = torch.bfloat16 if k.dtype == torch.bfloat16 == cache.dtype else torch.float32
    if (lib is None or not _rows_of_heads(k, source) or not _rows_of_heads(v, source)
            or v.stride() != k.stride() or slots.dim() != 1 or not i64_rows(slots, tokens)):
        return False
    total = cache.shape[1] * cache.shape[2]
    args = (k.data_ptr(), v.data_ptr(), k.stride(0), cache.data_ptr(), slots.data_ptr(), tokens,
            num_kv * hd, total)
    if source == torch.bfloat16:
        rc = lib.write_kv_bf16(*args)
    else:
        rc = lib.write_kv(*args, int(cache.dtype == torch.bfloat16))
    check_slots(rc, total)
    return rc == 0


def i64_rows(t: torch.Tensor, rows: int) -> bool:
    """A contiguous int64 CPU tensor with ``rows`` rows (slots, lengths, block tables)."""
    return t.device.type == "cpu" and t.dtype == torch.int64 and t.is_contiguous() and t.shape[0] == rows


def check_slots(rc: int, total: int) -> None:
    if rc == -3:
        raise IndexError(f"KV cache slot out of range [0, {total})")


def argmax_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's largest value and the index of its first occurrence, as ``x.max(dim=-1)``
    gives them (NaN never wins here); None where the kernel does not apply.

    x: (rows, n) float32 -> (best (rows,) float32, index (rows,) int64)"""
    lib = float32_kernels(x)
    if lib is None or x.dim() != 2:
        return None
    best = x.new_empty(x.shape[0])
    index = torch.empty(x.shape[0], dtype=torch.int64)
    rc = lib.argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], best.data_ptr(), index.data_ptr(),
                         torch.get_num_threads())
    return (best, index) if rc == 0 else None


def gumbel_argmax_rows(x: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                       temps: torch.Tensor) -> torch.Tensor | None:
    """Gumbel-max sampling of each row of ``x`` / ``temps`` with the sampler's counter-based
    noise (``layers.sampler.gumbel_noise``, made in place); None where the kernel does not
    apply.

    x: (rows, n) float32 (-inf: excluded), seeds, positions (rows,) int64, temps (rows,)
    float32 -> (rows,) int64"""
    lib = float32_kernels(x)
    if lib is None or x.dim() != 2:
        return None
    x = x.contiguous()
    seeds, positions = seeds.contiguous(), positions.contiguous()
    temps = temps.to(torch.float32).contiguous()
    index = torch.empty(x.shape[0], dtype=torch.int64)
    rc = lib.gumbel_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], seeds.data_ptr(),
                                positions.data_ptr(), temps.data_ptr(), index.data_ptr(),
                                torch.get_num_threads())
    return index if rc == 0 else None


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for the fused gate/up output; None where the kernel does not apply.
    Each element is computed alike wherever it sits (any width: a tp slice of the features
    gets the bits of the whole row).

    gate_up: (rows, 2 * inter) float32, or bf16 (computed in float32, rounded once)
    -> (rows, inter) of its dtype"""
    return _gated(gate_up, "silu_mul")


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """GELU (tanh approximation) of gate, times up; as :func:`silu_mul`."""
    return _gated(gate_up, "gelu_tanh_mul")


def _gated(gate_up: torch.Tensor, name: str) -> torch.Tensor | None:
    bf16 = gate_up.dtype == torch.bfloat16
    gate_up = gate_up.contiguous()  # a padded kernel's output is a slice of its columns
    lib = load() if bf16 and gate_up.device.type == "cpu" else float32_kernels(gate_up)
    if lib is None or gate_up.dim() != 2 or gate_up.shape[1] % 2:
        return None
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, inter)
    fn = getattr(lib, name + "_bf16" if bf16 else name)
    return out if fn(gate_up.data_ptr(), out.data_ptr(), rows, inter, torch.get_num_threads()) == 0 else None


def sigmoid(x: torch.Tensor) -> torch.Tensor | None:
    """sigmoid of a float32 tensor, each element computed alike wherever it sits; None where
    the kernel does not apply."""
    x = x.contiguous()
    lib = float32_kernels(x)
    if lib is None:
        return None
    out = torch.empty_like(x)
    return out if lib.sigmoid_rows(x.data_ptr(), out.data_ptr(), x.numel()) == 0 else None


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      window: int | None = None, softcap: float | None = None
                      ) -> torch.Tensor | None:
    """Causal attention of n new tokens over a context of ctx >= n keys whose last n are
    theirs (query i attends keys 0..ctx - n + i; with a ``window`` only those past
    ctx - n + i - window), with grouped-query heads, scores soft-capped by ``softcap``; None
    where the kernel does not apply.

    q: (n, num_q, hd); k, v: (ctx, num_kv, hd), rows the same stride apart -> (n, num_q, hd)"""
    lib = load()
    if (lib is None or not all(map(_rows_of_heads, (q, k, v))) or k.stride(0) != v.stride(0)
            or k.shape != v.shape or q.shape[2] != k.shape[2] or k.shape[0] < q.shape[0]):
        return None
    (n, num_q, hd), (ctx, num_kv, _) = q.shape, k.shape
    out = q.new_empty(n, num_q, hd)
    rc = lib.prefill_attention(q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0),
                               out.data_ptr(), num_q * hd, n, ctx, num_q, num_kv, hd, scale,
                               torch.get_num_threads(), int(window or 0), float(softcap or 0.0))
    if rc == -2:
        raise MemoryError("prefill_attention: could not allocate its scratch buffers")
    return out if rc == 0 else None

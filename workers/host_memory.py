"""Host memory for CPU workers: keep freed memory in the process, and put the large
long-lived tensors (weights, KV cache) on transparent huge pages.

Freed memory (``retain_freed_memory``). A forward pass allocates and frees the same large
buffers every step (gathered KV blocks, MLP activations). glibc serves allocations over its
mmap threshold with fresh ``mmap`` pages and unmaps them on free, so each step pays a page
fault per 4 KiB touched: on a batch-64 decode step that made gathering the KV cache 6x
slower than a plain copy. Turning off mmap-backed allocations and heap trimming makes the
allocator reuse the pages, at the price of keeping the step's peak working set resident
(it is needed again at the next step anyway).

Huge pages (``HugePageArena``). A decode step streams every weight once, and the KV cache
of every sequence; on 4 KiB pages such a stream crosses a page (a TLB miss, and the end of
what the hardware prefetcher will fetch ahead) every 4 KiB. Weights and caches therefore
live in anonymous mappings the kernel is asked to back with 2 MiB pages
(``madvise(MADV_HUGEPAGE)``: honoured where transparent huge pages are ``always`` or
``madvise``, ignored otherwise), many tensors to one mapping so that little is lost to
the partly used last page. Measured here (with the batch-1 matmul's four accumulator
chains): a batch-1 pass over the default model's weights went from 22-24 to 29-31 GB/s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from math import prod

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes (an int)


def retain_freed_memory() -> bool:
    """Tune glibc malloc in this process (see the module doc); False where it isn't glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


HUGE_PAGE = 2 << 20  # bytes: the x86-64 transparent huge page
ALIGN = 64  # bytes: each tensor starts on a cache line


class HugePageArena:
    """Zero-filled CPU tensors carved one after another out of large anonymous mappings
    madvised for transparent huge pages (a bump allocator; see the module doc).

    Tensors smaller than ``min_bytes`` come from ``torch.zeros`` (not worth a page of
    their own). A mapping lives as long as any tensor in it; drop the arena once the tensors
    are made (it holds the current mapping only to carve the next tensor from it).
    """

    def __init__(self, chunk_bytes: int = 64 << 20, min_bytes: int = 1 << 20):
        self.chunk_bytes, self.min_bytes = chunk_bytes, min_bytes
        self._map: mmap.mmap | None = None
        self._used = 0

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes:
            return torch.zeros(shape, dtype=dtype)
        if self._map is None or self._used + nbytes > len(self._map):
            self._map, self._used = _huge_page_mapping(max(self.chunk_bytes, nbytes)), 0
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes, offset=self._used)
        self._used += -(-nbytes // ALIGN) * ALIGN
        return flat.view(dtype).view(shape)  # fresh anonymous pages read as zeros


def _huge_page_mapping(nbytes: int) -> mmap.mmap:
    """An anonymous private mapping of ``nbytes`` rounded up to whole huge pages (so the
    kernel can align it to one), madvised for huge pages where the platform has them."""
    private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # private: a shared anonymous mapping is shmem, which THP's madvise mode leaves alone
    mapping = mmap.mmap(-1, size, flags=private) if private else mmap.mmap(-1, size)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mapping.madvise(advice)
        except OSError:  # THP compiled out: ordinary pages
            pass
    return mapping

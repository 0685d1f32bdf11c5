"""The huge-page arena that holds a CPU worker's weights and KV cache."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.host_memory import ALIGN, HUGE_PAGE, HugePageArena


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_tensors_are_zeros_side_by_side_and_cache_line_aligned():
    arena = HugePageArena(chunk_bytes=8 << 20, min_bytes=1 << 16)
    a = arena.zeros((300, 1000), torch.float32)  # 1.2 MB
    b = arena.zeros((5, 7, 4096), dtype=torch.float32)
    assert a.shape == (300, 1000) and b.shape == (5, 7, 4096) and a.dtype == b.dtype == torch.float32
    assert not a.any() and not b.any()
    assert b.data_ptr() == a.data_ptr() + -(-a.numel() * 4 // ALIGN) * ALIGN  # the next line
    a.fill_(1.0)  # writing one leaves the other alone
    assert not b.any() and a.sum() == a.numel()


def test_a_new_mapping_when_full_and_large_tensors_get_their_own():
    arena = HugePageArena(chunk_bytes=4 << 20, min_bytes=1 << 16)
    a = arena.zeros((3 << 20,), torch.uint8)
    b = arena.zeros((3 << 20,), torch.uint8)  # does not fit after a
    big = arena.zeros((10 << 20,), torch.uint8)  # larger than a chunk
    assert abs(b.data_ptr() - a.data_ptr()) >= 3 << 20 and big.numel() == 10 << 20
    big.fill_(7)
    assert int(big[-1]) == 7 and not a.any() and not b.any()


def test_small_tensors_come_from_torch_and_the_mapping_asks_for_huge_pages():
    arena = HugePageArena(min_bytes=1 << 20)
    small = arena.zeros((16,), torch.float32)
    assert not small.any()
    assert "hg" not in _vm_flags(small.data_ptr())
    large = arena.zeros((HUGE_PAGE,), torch.float32)  # 8 MiB
    large.fill_(1.0)
    assert "hg" in _vm_flags(large.data_ptr())  # madvise(MADV_HUGEPAGE) (a Linux with THP)
    assert large.sum() == HUGE_PAGE

"""The shared-memory segment behind the shm communicator: its layout, creation and attach.

See ``workers.comm.shm`` for the protocol that runs over it.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
import tempfile
import time

LINE_WORDS = 8  # 64-byte control lines
MAGIC, VERSION = 0x73686172646C6D31, 1  # "shardlm1"


def segment_path(group_id: str) -> str:
    """File name for group_id in /dev/shm (or the temp dir where there is none)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", group_id)
    if len(safe) > 80:
        safe = safe[:40] + "-" + hashlib.sha1(group_id.encode()).hexdigest()[:16]
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"shardlm-{safe}")


def pid_namespace() -> int:
    """Inode of this process's pid namespace (0 when unknown)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


class Layout:
    """Word indices and byte offsets of the segment for one (world_size, slot_bytes)."""

    def __init__(self, world_size: int, slot_bytes: int) -> None:
        ws = world_size
        self.world_size, self.slot_bytes = ws, slot_bytes
        self.mailbox_bytes = max(64, (slot_bytes // 8) // 64 * 64)
        self.npairs = ws * (ws - 1)
        n_lines = 1 + ws + 2 * self.npairs
        self.header_bytes = -(-n_lines * LINE_WORDS * 8 // 4096) * 4096
        self.coll_offset = self.header_bytes
        self.mailbox_offset = self.coll_offset + 2 * ws * slot_bytes
        self.total_bytes = self.mailbox_offset + self.npairs * 2 * self.mailbox_bytes

    def step_word(self, rank: int) -> int:
        return (1 + rank) * LINE_WORDS

    def pid_word(self, rank: int) -> int:
        return self.step_word(rank) + 1

    def pair(self, src: int, dst: int) -> int:
        return src * (self.world_size - 1) + (dst if dst < src else dst - 1)

    def sent_word(self, pair: int) -> int:
        return (1 + self.world_size + 2 * pair) * LINE_WORDS

    def acked_word(self, pair: int) -> int:
        return self.sent_word(pair) + LINE_WORDS

    def mailbox(self, pair: int, buf: int) -> int:
        """Byte offset of mailbox buffer `buf` of `pair`."""
        return self.mailbox_offset + (2 * pair + buf) * self.mailbox_bytes

    def header_values(self) -> list[int]:
        return [MAGIC, VERSION, self.world_size, self.slot_bytes, self.mailbox_bytes]


def create_segment(path: str, layout: Layout) -> mmap.mmap:
    """Create, size, reserve and initialise the segment, then publish it at `path`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, layout.total_bytes)
        _reserve(fd, layout.total_bytes, path)
        mm = mmap.mmap(fd, layout.total_bytes)
        words = memoryview(mm)[: layout.header_bytes].cast("q")
        for i, v in enumerate(layout.header_values()):
            words[i] = v
        words.release()
        os.replace(tmp, path)
        return mm
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def _reserve(fd: int, size: int, path: str) -> None:
    """Allocate the pages now, so a full /dev/shm fails here rather than with
    SIGBUS on first touch; skipped where the file system lacks fallocate."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise RuntimeError(f"cannot reserve {size >> 20} MiB for shm segment {path} ({e}); "
                               "enlarge /dev/shm or lower shm_slot_bytes") from e


def attach_segment(path: str, layout: Layout, rank: int, group_id: str,
                    timeout_s: float) -> mmap.mmap:
    """Map the segment rank 0 creates at `path`, waiting up to timeout_s for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(path, os.O_RDWR)
            break
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"shm group {group_id!r}: rank {rank} waited {timeout_s}s for rank 0 "
                    f"to create segment {path}") from None
            time.sleep(1e-3)
    try:
        size = os.fstat(fd).st_size
        if size != layout.total_bytes:
            raise RuntimeError(
                f"shm group {group_id!r}: segment {path} has {size} bytes, rank {rank} "
                f"expects {layout.total_bytes} (different world_size or slot size?)")
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    words = memoryview(mm)[: 8 * len(layout.header_values())].cast("q")
    found = list(words)
    words.release()
    if found != layout.header_values():
        mm.close()
        raise RuntimeError(f"shm group {group_id!r}: segment {path} header {found} does not "
                           f"match rank {rank}'s {layout.header_values()}")
    return mm

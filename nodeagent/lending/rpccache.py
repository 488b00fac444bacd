"""The weights lent devices keep for reloads: a directory per head, a size cap over them all.

ggml's rpc server saves each tensor a head sends with the cache flag as a file named by the
FNV-1a hash of its bytes, reads it back when a head offers that hash, and deletes nothing: a
head could fill the disk.  FNV-1a is no cryptographic hash, so each head has its own directory.
`WeightCache` holds the tree to `limit` bytes (a file counts at least BLOCK), least recently
used out first: on Linux it follows the directories with inotify in the agent's event loop (a
file opened is used now, and its mtime says so for the next scan; a write closed over the limit
evicts at once); elsewhere it trims (oldest mtime first) at each `dir_for`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import struct
import sys
from collections import OrderedDict
from pathlib import Path

BLOCK = 4096
_IN_CLOSE_WRITE, _IN_OPEN, _IN_Q_OVERFLOW = 0x8, 0x20, 0x4000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


class WeightCache:
    def __init__(self, root: Path, limit: int) -> None:
        self.root, self.limit = root, limit
        self.files: OrderedDict[Path, int] = OrderedDict()  # least recently used first
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = -1  # inotify's, once started on Linux
        self._dirs: dict[int, Path] = {}  # watch descriptor -> head directory

    def start(self) -> None:
        """Trim the tree, then follow it from the running event loop (Linux)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if sys.platform == "linux":
            self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd >= 0:
            asyncio.get_running_loop().add_reader(self._fd, self._read)
        for directory in self.root.iterdir():
            self.dir_for(directory.name)

    def close(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)

    def dir_for(self, head: str) -> Path:
        """`head`'s directory (an id: no path separators), created, followed and trimmed."""
        directory = self.root / head
        directory.mkdir(exist_ok=True)
        if self._fd >= 0 and directory not in self._dirs.values():
            watch = self._libc.inotify_add_watch(self._fd, os.fsencode(directory),
                                                 _IN_OPEN | _IN_CLOSE_WRITE)
            self._dirs[watch] = directory
        self._scan()
        return directory

    def _scan(self) -> None:
        found = []
        for path in self.root.glob("*/*"):
            with contextlib.suppress(OSError):
                found.append((path.stat().st_mtime_ns, path, max(path.stat().st_size, BLOCK)))
        self.files = OrderedDict((path, size) for _, path, size in sorted(found))
        self._evict()

    def _read(self) -> None:
        with contextlib.suppress(BlockingIOError):
            data, offset = os.read(self._fd, 1 << 16), 0
            while offset < len(data):
                watch, mask, _, size = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size:offset + _EVENT.size + size].rstrip(b"\0")
                offset += _EVENT.size + size
                path = self._dirs[watch] / os.fsdecode(name) if watch in self._dirs else None
                if mask & _IN_Q_OVERFLOW:
                    self._scan()
                elif path and name and (mask & _IN_CLOSE_WRITE or path in self.files):
                    self.files.pop(path, None)  # a file being written counts once closed
                    with contextlib.suppress(OSError):
                        os.utime(path)
                        self.files[path] = max(path.stat().st_size, BLOCK)
            self._evict()

    def _evict(self) -> None:
        total = sum(self.files.values())
        while total > self.limit and self.files:
            path, size = self.files.popitem(last=False)
            total -= size
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

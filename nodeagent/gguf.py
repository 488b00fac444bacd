"""A small GGUF header reader: the metadata key/values and tensor sizes, without loading weights.

`read_header` returns the scalars; for each array (mostly the tokenizer's vocabulary) only its
element count (`tokenizer.ggml.tokens` -> the vocabulary size), skipped undecoded, so a 262k-token
vocabulary reads in about 0.1 s; and each tensor's data size, from the tensor infos' offsets.
Every length and count is checked against the file's size before use, so a corrupt or truncated
file raises `GGUFError` instead of allocating or seeking absurdly.
"""

from __future__ import annotations

import itertools
import os
import struct
from typing import BinaryIO, NamedTuple

Value = str | int | float | bool

# type code -> struct format of one scalar (little-endian)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_BLOCK = 1 << 20  # bytes read at a time; the vocabulary's strings come a block at a time
_MAX_NESTING = 8  # real files nest arrays at most once; deeper is corruption


class GGUFError(ValueError):
    """Not a GGUF file, an unsupported version, or a truncated or corrupt one."""


class Header(NamedTuple):
    metadata: dict[str, Value]  # the scalar key/values
    arrays: dict[str, int]  # array key -> its element count (elements not decoded)
    tensors: dict[str, int]  # tensor name -> bytes of its data (alignment padding included)


class _Cursor:
    """Bounds-checked reads and skips over one open file, through a block buffer.  Not mmap: a
    file truncated while mapped (a copy over it) would kill the process with SIGBUS."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self.f, self.name = f, name
        self.size = os.fstat(f.fileno()).st_size
        self.pos, self.buf, self.buf_at = 0, b"", 0

    def _take(self, n: int) -> int:
        """Advance by n bytes, returning where they start in the buffer (loaded if needed)."""
        start = self.pos
        if n > self.size - start:
            raise GGUFError(f"{self.name}: truncated GGUF file "
                            f"(needs {n} more bytes at offset {start})")
        self.pos = start + n
        if start < self.buf_at or self.pos > self.buf_at + len(self.buf):
            self.f.seek(start)
            self.buf, self.buf_at = self.f.read(max(n, _BLOCK)), start
            if len(self.buf) < n:
                raise GGUFError(f"{self.name}: truncated GGUF file (shrank while read)")
        return start - self.buf_at

    def read(self, n: int) -> bytes:
        at = self._take(n)
        return self.buf[at:at + n]

    def skip(self, n: int) -> None:
        if n > self.size - self.pos:
            self._take(n)  # raises
        self.pos += n

    def scalar(self, fmt: str) -> int | float | bool:
        at = self._take(struct.calcsize(fmt))  # before reading self.buf: it may reload it
        value: int | float | bool = struct.unpack_from(fmt, self.buf, at)[0]
        return value

    def u32(self) -> int:
        return int(self.scalar("<I"))

    def u64(self) -> int:
        return int(self.scalar("<Q"))

    def string(self) -> str:
        return self.read(self.u64()).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Skip `count` strings: the hot loop (a 262k-token vocabulary), so kept lean."""
        u64 = _U64.unpack_from
        for _ in range(count):
            at = self._take(8)
            self.skip(u64(self.buf, at)[0])


def _skip_array(c: _Cursor, depth: int = 0) -> int:
    kind, count = c.u32(), c.u64()
    if kind in _SCALARS:
        c.skip(count * struct.calcsize(_SCALARS[kind]))
    elif kind == _STRING:
        c.skip_strings(count)
    elif kind == _ARRAY and depth < _MAX_NESTING:
        for _ in range(count):
            _skip_array(c, depth + 1)
    else:
        raise GGUFError(f"{c.name}: bad GGUF array element type {kind} at offset {c.pos}")
    return count


def read_header(path: str | os.PathLike[str]) -> Header:
    """The scalar metadata, array lengths and tensor sizes of a GGUF (v2/v3) file.  `GGUFError`
    if it is not GGUF, has another version, or is truncated or corrupt; `OSError` if unopenable."""
    name = os.fspath(path)
    with open(path, "rb") as f:
        c = _Cursor(f, name)
        if c.size < 4 or c.read(4) != b"GGUF":
            raise GGUFError(f"{name} is not a GGUF file (bad magic)")
        if (version := c.u32()) not in (2, 3):
            raise GGUFError(f"{name}: unsupported GGUF version {version}")
        n_tensors = c.u64()
        out: dict[str, Value] = {}
        arrays: dict[str, int] = {}
        for _ in range(c.u64()):
            key, kind = c.string(), c.u32()
            if kind in _SCALARS:
                out[key] = c.scalar(_SCALARS[kind])
            elif kind == _STRING:
                out[key] = c.string()
            elif kind == _ARRAY:
                arrays[key] = _skip_array(c)
            else:
                raise GGUFError(f"{name}: unknown GGUF value type {kind} at key {key!r}")
        starts = []
        for _ in range(n_tensors):  # name, n_dims, dims (u64 each), type, offset in the data
            tensor = c.string()
            c.skip(8 * c.u32() + 4)
            starts.append((c.u64(), tensor))
        align = a if isinstance(a := out.get("general.alignment", 32), int) and a > 0 else 32
        ends = [*sorted(starts), (c.size - -(-c.pos // align) * align, "")]
        tensors = {t: end - start for (start, t), (end, _) in itertools.pairwise(ends)}
        if any(size < 0 for size in tensors.values()):
            raise GGUFError(f"{name}: truncated GGUF file (tensor data past its end)")
        return Header(out, arrays, tensors)

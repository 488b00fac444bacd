"""A small GGUF header reader: the metadata key/values, without loading weights.

Scalars are returned; arrays (the tokenizer's vocabulary, mostly) are skipped by seeking, so a
file with a 262k-token vocabulary reads in milliseconds.  Tensor data is never touched.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

Value = str | int | float | bool

_MAGIC = b"GGUF"
# type code -> struct format of one scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """Not a GGUF file, or a truncated one."""


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFError(f"truncated GGUF file {getattr(f, 'name', '')!s}")
    return data


def _unpack(f: BinaryIO, fmt: str) -> int | float | bool:
    value: int | float | bool = struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    return value


def _string(f: BinaryIO) -> str:
    length = int(_unpack(f, "<Q"))
    return _read(f, length).decode("utf-8", errors="replace")


def _skip_array(f: BinaryIO) -> None:
    kind = int(_unpack(f, "<I"))
    count = int(_unpack(f, "<Q"))
    if kind in _SCALARS:
        f.seek(count * struct.calcsize(_SCALARS[kind]), os.SEEK_CUR)
    elif kind == _STRING:
        for _ in range(count):
            f.seek(int(_unpack(f, "<Q")), os.SEEK_CUR)
    elif kind == _ARRAY:
        for _ in range(count):
            _skip_array(f)
    else:
        raise GGUFError(f"unknown GGUF array element type {kind}")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Value]:
    """The scalar metadata of a GGUF (v2/v3) file; raises `GGUFError` if it is not one."""
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise GGUFError(f"{os.fspath(path)} is not a GGUF file (bad magic)")
        version = int(_unpack(f, "<I"))
        if version not in (2, 3):
            raise GGUFError(f"{os.fspath(path)}: unsupported GGUF version {version}")
        _unpack(f, "<Q")  # tensor count
        kv_count = int(_unpack(f, "<Q"))
        out: dict[str, Value] = {}
        for _ in range(kv_count):
            key = _string(f)
            kind = int(_unpack(f, "<I"))
            if kind in _SCALARS:
                out[key] = _unpack(f, _SCALARS[kind])
            elif kind == _STRING:
                out[key] = _string(f)
            elif kind == _ARRAY:
                _skip_array(f)
            else:
                raise GGUFError(f"{os.fspath(path)}: unknown GGUF value type {kind} at {key}")
        return out

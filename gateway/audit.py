"""The audit log: one JSON line per routing decision, appended and flushed as it happens.

No prompt text is written unless the policy's `[audit] prompts = true` asks for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import msgspec


class AuditEntry(msgspec.Struct, frozen=True, omit_defaults=True):
    time: float  # unix seconds
    request_id: str
    endpoint: str
    model: str | None
    client: str | None
    rule: str
    target: str | None
    status: int
    latency_ms: float
    reason: str | None = None
    body: str | None = None  # the request body, only when the policy asks for prompts


class AuditLog:
    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._file: IO[bytes] | None = None
        self._encoder = msgspec.json.Encoder()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()

    def record(self, entry: AuditEntry) -> None:
        if self._file is not None:
            self._file.write(self._encoder.encode(entry) + b"\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

"""The audit log: one JSON line per routing decision, appended and flushed as it happens.

No prompt text is written unless the policy's `[audit] prompts = true` asks for it.  Fields the
client chose are cut to `MAX_FIELD` characters, with their length (`bounded`).  The file is the
user's record of who asked what, so only its owner may read it: created 0600, and tightened to
0600 if it is wider (a log from before this rule, or a copy made readable); a file the gateway
cannot tighten is used as it is, with a warning.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import IO

import msgspec

MAX_FIELD = 256

log = logging.getLogger("myco.gateway.audit")


class Attempt(msgspec.Struct, frozen=True):  # one target the request was sent to
    target: str
    outcome: str  # "answered 200", or why the next target was tried


class AuditEntry(msgspec.Struct, frozen=True, omit_defaults=True):
    time: float  # unix seconds
    request_id: str
    endpoint: str  # the client's API: chat, completions, embeddings, responses, messages
    model: str | None
    client: str | None
    rule: str
    target: str | None
    status: int
    latency_ms: float
    reason: str | None = None
    attempts: tuple[Attempt, ...] = ()  # every target tried, in order
    body: str | None = None  # the request body, only when the policy asks for prompts


def bounded(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_FIELD:
        return text
    return f"{text[:MAX_FIELD]}... ({len(text)} characters)"


class AuditLog:
    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._file: IO[bytes] | None = None
        self._encoder = msgspec.json.Encoder()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
                try:
                    os.fchmod(fd, 0o600)
                except OSError as exc:
                    log.warning("audit log %s is readable by others and cannot be made "
                                "private: %s", self.path, exc.strerror)
            self._file = os.fdopen(fd, "ab")

    def record(self, entry: AuditEntry) -> None:
        if self._file is not None:
            self._file.write(self._encoder.encode(entry) + b"\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

"""Answers checked against the official SDKs' own types (openai, anthropic): each must parse as
the SDK's type, and carry no field the SDK does not know (the SDKs' models keep unknown
fields aside as extras; here any extra is a failure).  Also: server-sent events read as sent,
and the gateway's audit entry of a request."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pydantic

from tests.procs import Proc


def strict(kind: Any, data: Any) -> Any:
    """`data` parsed as `kind` (a model or a union of models); AssertionError naming any
    field the SDK does not know."""
    value = pydantic.TypeAdapter(kind).validate_python(data)
    unknown = list(_unknown(value, "$"))
    assert not unknown, f"fields the SDK does not know: {unknown} in {data}"
    return value


def _unknown(value: Any, where: str) -> Iterator[str]:
    if isinstance(value, pydantic.BaseModel):
        yield from (f"{where}.{key}" for key in value.model_extra or {})
        for name in type(value).model_fields:
            yield from _unknown(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _unknown(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _unknown(item, f"{where}.{key}")


def sse(lines: Iterable[str]) -> list[tuple[str | None, dict[str, Any]]]:
    """(event name, data) of each server-sent event; `data` the JSON it carries."""
    events, name = [], None
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line[5:])))
            name = None
    return events


def audit_entry(gateway: Proc, request_id: str) -> dict[str, Any]:
    path: Path = gateway.audit_path  # type: ignore[attr-defined]
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    found = [e for e in entries if e["request_id"] == request_id]
    assert len(found) == 1, (request_id, entries[-3:])
    return found[0]

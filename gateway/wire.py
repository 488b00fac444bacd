"""The few request fields routing needs, decoded without touching the rest of the body."""

from __future__ import annotations

import re
from typing import TypeVar, cast

import msgspec

from gateway.policy import EndpointKind
from myco.errors import BadRequest


class RoutingFields(msgspec.Struct, frozen=True):
    model: str
    stream: bool | None = None
    tools: msgspec.Raw = msgspec.Raw(b"null")  # presence is all routing needs

    @property
    def has_tools(self) -> bool:
        return bytes(self.tools).strip() not in (b"null", b"[]", b"")


class DryRunFields(RoutingFields, frozen=True):
    endpoint: EndpointKind = "chat"


T = TypeVar("T", bound="RoutingFields")

_decoders = {kind: msgspec.json.Decoder(kind) for kind in (RoutingFields, DryRunFields)}


def decode(raw: bytes, kind: type[T]) -> T:
    """Decode `raw`; bad JSON or a missing/wrong-typed routing field is a 400 naming it."""
    try:
        return cast(T, _decoders[kind].decode(raw))
    except msgspec.ValidationError as exc:
        text = str(exc)
        found = re.search(r"at `\$\.?([^`]*)`", text) or re.search(r"field `([^`]+)`", text)
        param = found.group(1) if found else None
        if text.startswith("Expected `object`"):
            raise BadRequest("request body must be a JSON object") from None
        raise BadRequest(f"invalid request: {text}", param=param) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None

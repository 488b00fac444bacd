"""The few request fields routing needs, and the body the gateway forwards.

The forwarded body is re-encoded from what was parsed: each top-level key once (the last one,
as msgspec and most JSON parsers read a repeated key), every value byte for byte.  The routing
fields are then read from those very bytes, so what the policy resolved is what the target
reads; a target that would take the first of two `model` keys never sees two.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar, cast

import msgspec

from gateway.policy import EndpointKind
from myco.errors import BadRequest

_NONE = (b"null", b"[]", b"{}", b"")


class RoutingFields(msgspec.Struct, frozen=True):
    model: str
    stream: bool | None = None
    # Presence is all routing needs.  `functions`/`function_call` are tool calling before
    # `tools` existed: a route that keeps tool use local must see them too.
    tools: msgspec.Raw = msgspec.Raw(b"null")
    functions: msgspec.Raw = msgspec.Raw(b"null")
    function_call: msgspec.Raw = msgspec.Raw(b"null")

    @property
    def has_tools(self) -> bool:
        return any(bytes(v).strip() not in _NONE
                   for v in (self.tools, self.functions, self.function_call))


class DryRunFields(RoutingFields, frozen=True):
    endpoint: EndpointKind = "chat"


T = TypeVar("T", bound="RoutingFields")
D = TypeVar("D")

_decoders: dict[type, msgspec.json.Decoder[Any]] = {
    kind: msgspec.json.Decoder(kind) for kind in (RoutingFields, DryRunFields)}
_object = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder = msgspec.json.Encoder()


def decode(raw: bytes, kind: type[T]) -> T:
    return cast(T, checked(_decoders[kind], raw))


def forwarded(raw: bytes, kind: type[T]) -> tuple[bytes, T]:
    """The body to forward (each top-level key once, values unchanged) and its routing fields."""
    body = _encoder.encode(checked(_object, raw))
    return body, decode(body, kind)


def checked(decoder: msgspec.json.Decoder[D], raw: bytes) -> D:
    """`decoder.decode(raw)`; bad JSON or a missing/wrong-typed field is a 400 naming it."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        if (text := str(exc)).startswith("Expected `object`"):
            raise BadRequest("request body must be a JSON object") from None
        found = re.search(r"at `\$\.?([^`]*)`", text) or re.search(r"field `([^`]+)`", text)
        param = found.group(1) if found else None
        raise BadRequest(f"invalid request: {text}", param=param) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None

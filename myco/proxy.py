"""Relay an upstream HTTP response to a litestar client: bytes as they arrive, nothing buffered.

Used by the gateway (to nodes and upstreams) and by the node agent (to its model runners).
The upstream response is always closed, also when the client goes away mid-stream; then
`closed` is called (the node agent holds a request's place in its queue until then).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

import httpx
from litestar import Response
from litestar.response import Stream

from myco.errors import TargetFailed, encode_error

# Headers that describe the upstream hop, not the body we relay.
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                  "content-encoding", "server", "date"})


class Upstream(Protocol):
    """What the relay needs of a response: httpx.Response and gateway.upstream both have it."""

    status_code: int

    @property
    def headers(self) -> Mapping[str, str]: ...
    async def aread(self) -> bytes: ...
    def aiter_raw(self) -> AsyncIterator[bytes]: ...
    async def aclose(self) -> None: ...


def relay_headers(response: Upstream, extra: dict[str, str]) -> dict[str, str]:
    headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP}
    headers.update(extra)
    return headers


async def relay(response: Upstream, extra_headers: dict[str, str],
                closed: Callable[[], object] = lambda: None) -> Response[bytes] | Stream:
    """Turn an httpx response opened with `stream=True` into a litestar response."""
    headers = relay_headers(response, extra_headers)
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        try:
            body = await response.aread()
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            raise TargetFailed(f"upstream failed: {reason}") from None
        finally:
            await response.aclose()
            closed()
        return Response(body, status_code=response.status_code, headers=headers,
                        media_type=response.headers.get("content-type"))
    return Stream(_chunks(response, closed), status_code=response.status_code, headers=headers,
                  media_type="text/event-stream")


async def _chunks(response: Upstream, closed: Callable[[], object]) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        # Headers are gone already: end the stream with an error event the client can read.
        message = f"upstream failed mid-stream: {type(exc).__name__}: {exc}".rstrip(": ")
        yield b"\n\ndata: " + encode_error(message, "api_error", None, "target_failed") + b"\n\n"
    finally:
        await response.aclose()
        closed()

"""Relay the HTTP response of a node, an upstream or a model runner to a litestar client.

- Only allowlisted response headers pass (`relay_headers`): content type, rate-limit and retry
  hints, request ids.  Cookies, CORS grants and any `x-myco-*` of the hop are dropped: the
  `x-myco-*` headers of an answer are only ever the relaying process's own (`extra_headers`).
- An event stream is relayed as it arrives, unbuffered; the client's leaving closes it.
- Any other answer is read whole first, watching the client meanwhile (`receive`, once the
  request body has been read; see `unless_gone`).  A failure while reading, or an answer over
  `max_body` bytes (the upstream connection is then closed), raises `TargetLost`: nothing has
  reached the client, so the caller may send the request elsewhere.
- The upstream response is always closed; then `closed` is called (the node agent holds a
  request's place in its queue until then).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import httpx
from litestar import Response
from litestar.response import Stream

from myco.errors import MycoError, TargetFailed, encode_error

_ALLOWED = frozenset({"content-type", "retry-after", "retry-after-ms", "x-request-id",
                      "request-id", "openai-processing-ms"})
_ALLOWED_PREFIXES = ("x-ratelimit-", "ratelimit", "anthropic-ratelimit-")

Receive = Callable[[], Awaitable[Mapping[str, Any]]]  # ASGI receive
T = TypeVar("T")


class TargetLost(TargetFailed):
    """The target failed before any byte of its answer reached the client."""


class ClientGone(MycoError):
    """The client left before the answer was ready (nginx's 499: nobody reads it)."""

    status = 499
    code = "client_closed_request"


class Relayed(Protocol):
    """What the relay needs of a response: httpx.Response and gateway.pool.PooledResponse."""

    status_code: int
    @property
    def headers(self) -> Mapping[str, str]: ...
    def aiter_raw(self) -> AsyncIterator[bytes]: ...
    async def aclose(self) -> None: ...


def relay_headers(response: Relayed, extra: dict[str, str]) -> dict[str, str]:
    headers = {k: v for k, v in response.headers.items()
               if (name := k.lower()) in _ALLOWED or name.startswith(_ALLOWED_PREFIXES)}
    headers.update(extra)
    return headers


async def relay(response: Relayed, extra_headers: dict[str, str],
                closed: Callable[[], object] = lambda: None, *, receive: Receive | None = None,
                max_body: int | None = None) -> Response[bytes] | Stream:
    """Turn a response opened for streaming into a litestar response (see the module)."""
    headers = relay_headers(response, extra_headers)
    media = response.headers.get("content-type")
    if not (media or "").startswith("text/event-stream"):
        try:
            body = await _read(response, max_body) if receive is None else \
                await unless_gone(_read(response, max_body), receive)
        finally:
            await response.aclose()
            closed()
        return Response(body, status_code=response.status_code, headers=headers, media_type=media)
    return Stream(_chunks(response, closed), status_code=response.status_code, headers=headers,
                  media_type="text/event-stream")


async def _read(response: Relayed, limit: int | None) -> bytes:
    declared = response.headers.get("content-length", "")
    too_large = TargetLost(f"answer larger than {limit} bytes (the limit for an answer "
                           "that is not streamed)")
    if limit is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if limit is not None and size > limit:
                raise too_large
            chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise TargetLost(f"answer cut short: {type(exc).__name__}: {exc}".rstrip(": ")) \
            from None
    return b"".join(chunks)


async def unless_gone(work: Awaitable[T], receive: Receive, after: float = 0.05) -> T:
    """Await `work`; if the client disconnects first (`receive`, the ASGI receive of a request
    whose body was read), cancel it and raise `ClientGone`.  Cancelling closes what `work` had
    open upstream, so the next hop sees the disconnect too.  The client is watched from
    `after` seconds on, so that a quick answer pays for a timer, not for a watcher task."""
    task = asyncio.current_task()
    assert task is not None
    gone = False
    watcher: asyncio.Future[None] | None = None

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    def start() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(watch())

    timer = asyncio.get_running_loop().call_later(after, start)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientGone("the client went away before the answer was ready") from None
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


async def _chunks(response: Relayed, closed: Callable[[], object]) -> AsyncIterator[bytes]:
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

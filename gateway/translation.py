"""A client API served by translation (gateway/responses.py, gateway/messages.py): a `Dialect`
turns one request into a chat completions request for the one data path (`Gateway.forward`),
and the chat answer back, through one state machine over its items (text, tool calls: each
opened, extended, closed), each step giving the client's events at once.  A stream is
translated line by line as it arrives; a whole answer takes the same steps (`result()`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

import msgspec
from litestar import Response
from litestar.response import Stream

from gateway.policy import EndpointKind
from gateway.wire import checked
from myco.errors import BadRequest, TargetFailed

Answer = Response[bytes] | Stream
Item = dict[str, Any]  # {"type": "text", "text"} or {"type": "call", "id", "name", "arguments"}
encode, _object = msgspec.json.encode, msgspec.json.Decoder(dict[str, Any])


def clean(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def refused(param: str, what: str) -> BadRequest:
    return BadRequest(f"{param}: {what} cannot be served by this gateway", param=param)


def sse(kind: str, **fields: Any) -> bytes:
    """One event, named as its `type` (both APIs name them so)."""
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), encode({"type": kind, **fields}))


class Dialect:
    endpoint: EndpointKind
    path = "/chat/completions"
    chat: Callable[[dict[str, Any], str | None], dict[str, Any]]  # or BadRequest
    start: Callable[[], bytes]
    opened: Callable[[Item], bytes]  # an item begins
    delta: Callable[[str], bytes]  # text or arguments for the last item
    closed: Callable[[Item], bytes]
    end: Callable[[], bytes]  # after the last item closed
    fail: Callable[[str], bytes]
    result: Callable[[], dict[str, Any]]
    finish: str | None = None
    usage: dict[str, int] | None = None
    ended = is_open = False

    def __init__(self) -> None:
        self.items: list[Item] = []

    def chat_body(self, raw: bytes, client: str | None) -> bytes:
        try:
            return encode(self.chat(checked(_object, raw), client))
        except (AttributeError, TypeError) as exc:  # a nested field of the wrong type
            raise BadRequest(f"invalid request: {type(exc).__name__}: {exc}") from None

    def error_body(self, status: int, body: bytes) -> bytes:
        return body

    def begin(self, item: Item) -> bytes:
        out, self.is_open = self.shut(), True
        self.items.append(item)
        return out + self.opened(item)

    def shut(self) -> bytes:
        was, self.is_open = self.is_open, False
        return self.closed(self.items[-1]) if was else b""

    def extend(self, kind: str, delta: str) -> bytes:
        """`delta` for the open item of `kind`: text opens one if need be, arguments without
        their call are dropped."""
        opened = self.is_open and self.items[-1]["type"] == kind
        if not opened and kind != "text":
            return b""
        out = b"" if opened else self.begin({"type": "text", "text": ""})
        self.items[-1]["text" if kind == "text" else "arguments"] += delta
        return out + self.delta(delta)

    def feed(self, chunk: Any) -> bytes:
        """One chat chunk (of a whole answer: its message as `delta`) as the client's events."""
        if self.ended or not isinstance(chunk, dict):
            return b""
        if (error := chunk.get("error")) is not None:
            self.ended = True
            return self.fail(str(error.get("message") if isinstance(error, dict) else error))
        out, self.usage = b"", chunk.get("usage") or self.usage
        for choice in (chunk.get("choices") or [])[:1]:
            delta = choice.get("delta") or {}
            out += self.extend("text", delta["content"]) if delta.get("content") else b""
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                if call.get("id"):
                    out += self.begin({"type": "call", "id": call["id"], "arguments": "",
                                       "name": function.get("name", "")})
                out += self.extend("call", function["arguments"]) if function.get(
                    "arguments") else b""
            self.finish = choice.get("finish_reason") or self.finish
        return out

    def close(self) -> bytes:
        out, self.ended = b"" if self.ended else self.shut() + self.end(), True
        return out

    async def events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The chat stream `chunks` translated as it arrives (and closed with it)."""
        def line(text: bytes) -> bytes:
            kind, _, data = text.strip().partition(b":")
            with contextlib.suppress(msgspec.DecodeError):
                if kind == b"data":
                    return self.close() if data.strip() == b"[DONE]" else \
                        self.feed(msgspec.json.decode(data))
            return b""
        yield self.start()
        rest = b""
        try:
            async for chunk in chunks:
                *lines, rest = (rest + chunk).split(b"\n")
                if out := b"".join(map(line, lines)):
                    yield out
            yield line(rest) + self.close()
        finally:
            await cast(AsyncGenerator[bytes, None], chunks).aclose()

    def answer(self, answer: Answer) -> Answer:
        """The target's answer in the client's API, its status and route headers kept; an
        error's body by `error_body`."""
        stream = isinstance(answer, Stream)  # the header: a handler's media type would win
        headers = {**{k: v for k, v in answer.headers.items() if k.lower() != "content-type"},
                   "content-type": "text/event-stream" if stream else "application/json"}
        if isinstance(answer, Stream):
            return Stream(self.events(cast(AsyncIterator[bytes], answer.iterator)),
                          status_code=answer.status_code, headers=headers)
        status = answer.status_code or 200
        body = self.error_body(status, answer.content) if status >= 400 else \
            encode(self.whole(answer.content))
        return Response(body, status_code=status, headers=headers)

    def whole(self, body: bytes) -> dict[str, Any]:
        try:
            answer = msgspec.json.decode(body)
            choice = answer["choices"][0]
            chunk = {"choices": [{"delta": choice["message"], "finish_reason":
                                  choice.get("finish_reason")}], "usage": answer.get("usage")}
        except (msgspec.DecodeError, LookupError, TypeError, AttributeError):
            raise TargetFailed("the target's answer is not a chat completion") from None
        self.start()
        self.feed(chunk)
        self.close()
        return self.result()

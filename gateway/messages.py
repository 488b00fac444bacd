"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) as chat
completions (gateway/translation.py): system, text, tool_use and tool_result blocks, tools,
tool_choice, output_config.format.  stop_reason is end_turn also where a stop sequence ended
the answer (a chat answer does not say which).  Errors are Anthropic's shape, the gateway's own
too (`anthropic_errors`).  A node counts tokens (protocol.TOKENS_PATH); an upstream cannot.
Images, documents, server tools, extended thinking and `_REFUSED` are a 400.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from litestar import Request, Response

from gateway.translation import Dialect, Item, clean, encode, refused, sse
from myco import protocol
from myco.errors import BadRequest, TargetFailed, error_message
from myco.handlers import Handler

_REFUSED = ("top_k", "mcp_servers", "container")
_STOPS = {"length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
           404: "not_found_error", 429: "rate_limit_error", 504: "timeout_error"}
_CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # else the tool named


def error_body(status: int, body: bytes) -> bytes:
    kind = _ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return encode({"type": "error", "error": {"type": kind, "message": error_message(body)}})


def anthropic_errors(handlers: dict[Any, Handler]) -> dict[Any, Handler]:
    """The gateway's exception handlers (myco/handlers.py), answering in Anthropic's shape."""
    def anthropic(handler: Handler) -> Handler:
        def handle(request: Request[Any, Any, Any], exc: Any) -> Response[Any]:
            response = handler(request, exc)
            response.content = error_body(response.status_code or 500, response.content)
            return response
        return handle
    return {kind: anthropic(handler) for kind, handler in handlers.items()}


def _text(blocks: str | list[dict[str, Any]], param: str) -> str:
    for j, block in enumerate([] if isinstance(blocks, str) else blocks):
        if block.get("type") != "text":
            raise refused(f"{param}[{j}]", f"{block.get('type')!r} (text only)")
    return blocks if isinstance(blocks, str) else "".join(b.get("text", "") for b in blocks)


def messages(r: dict[str, Any]) -> list[dict[str, Any]]:
    system = _text(r.get("system") or "", "system")
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, message in enumerate(r.get("messages") or []):
        role, content, text, calls = message.get("role"), message.get("content"), [], []
        for j, block in enumerate([{"type": "text", "text": content}]
                                  if isinstance(content, str) else content or []):
            kind, where = block.get("type"), f"messages[{i}].content[{j}]"
            if kind == "text":
                text.append(block.get("text", ""))
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": block.get("id"), "type": "function", "function": {
                    "name": block.get("name"), "arguments": encode(block.get("input", {}))
                    .decode()}})
            elif kind == "tool_result" and role == "user":
                result = _text(block.get("content", ""), f"{where}.content")
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": "error: " + result if block.get("is_error") else result})
            else:
                raise refused(where, f"{kind!r} in a {role} message (images included)")
        if text or calls:
            out.append(clean({"role": role, "content": "".join(text), "tool_calls": calls or None}))
    return out


class Messages(Dialect):
    endpoint = "messages"

    def __init__(self, count: bool = False) -> None:
        super().__init__()
        self.path = protocol.TOKENS_PATH if count else self.path
        self.id = "msg_" + uuid.uuid4().hex

    def chat(self, r: dict[str, Any], client: str | None) -> dict[str, Any]:
        self.request, counting = r, self.path == protocol.TOKENS_PATH
        for name in (name for name in _REFUSED if r.get(name)):
            raise refused(name, f"`{name}`")
        if (r.get("thinking") or {}).get("type", "disabled") != "disabled":
            raise refused("thinking", "extended thinking")
        if r.get("max_tokens") is None and not counting:
            raise BadRequest("max_tokens is required", param="max_tokens")
        tools, choice = r.get("tools") or [], r.get("tool_choice") or {}
        fmt = (r.get("output_config") or {}).get("format")  # structured output: a JSON schema
        for i, tool in enumerate(tools):
            if tool.get("type", "custom") != "custom":
                raise refused(f"tools[{i}]", f"server tool {tool.get('type')!r}")
        return clean({
            "model": r.get("model"), "messages": messages(r), "stop": r.get("stop_sequences"),
            "tools": [{"type": "function", "function": clean({
                "name": tool.get("name"), "parameters": tool.get("input_schema"),
                "description": tool.get("description")})} for tool in tools] or None,
            "tool_choice": _CHOICES.get(choice.get("type", "auto")) or {
                "type": "function", "function": {"name": choice.get("name")}} if tools else None,
            "parallel_tool_calls": False if tools and choice.get("disable_parallel_tool_use")
            else None, "temperature": r.get("temperature"), "top_p": r.get("top_p"),
            "max_tokens": None if counting else r.get("max_tokens"), "response_format": fmt and {
                "type": "json_schema", "json_schema": {"name": "out", "schema": fmt.get("schema")}},
            "user": (r.get("metadata") or {}).get("user_id"), "stream": r.get("stream") or None,
            "stream_options": {"include_usage": True} if r.get("stream") else None})

    error_body = staticmethod(error_body)

    def whole(self, body: bytes) -> dict[str, Any]:
        if self.path != protocol.TOKENS_PATH:
            return super().whole(body)
        try:
            count = msgspec.json.decode(body, type=protocol.TokenCount)
        except msgspec.DecodeError:
            raise TargetFailed("the target's answer is not a token count") from None
        return {"input_tokens": count.input_tokens}

    @staticmethod
    def block(it: Item) -> dict[str, Any]:
        if it["type"] == "text":
            return it
        try:
            value = msgspec.json.decode(it["arguments"] or "{}")
        except msgspec.DecodeError:  # cut short by the token limit
            value = {}
        return {"type": "tool_use", "id": it["id"], "name": it["name"],
                "input": value if isinstance(value, dict) else {}}

    def result(self) -> dict[str, Any]:
        used = self.usage or {}
        return {"id": self.id, "type": "message", "role": "assistant",
                "model": self.request.get("model"), "content": list(map(self.block, self.items)),
                "stop_reason": _STOPS.get(self.finish or "", "end_turn"), "stop_sequence": None,
                "usage": {"input_tokens": used.get("prompt_tokens", 0),
                          "output_tokens": used.get("completion_tokens", 0)}}

    def start(self) -> bytes:
        return sse("message_start", message={**self.result(), "stop_reason": None})

    def opened(self, it: Item) -> bytes:
        return sse("content_block_start", index=len(self.items) - 1, content_block=self.block(it))

    def delta(self, delta: str) -> bytes:
        text = self.items[-1]["type"] == "text"
        return sse("content_block_delta", index=len(self.items) - 1, delta={
            "type": "text_delta", "text": delta} if text else {
            "type": "input_json_delta", "partial_json": delta})

    def closed(self, it: Item) -> bytes:
        return sse("content_block_stop", index=len(self.items) - 1)

    def end(self) -> bytes:
        done = self.result()
        return sse("message_delta", usage=done["usage"], delta={
            "stop_reason": done["stop_reason"], "stop_sequence": None}) + sse("message_stop")

    def fail(self, message: str) -> bytes:
        return sse("error", error={"type": "api_error", "message": message})

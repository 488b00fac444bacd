"""OpenAI's Responses API (`POST /v1/responses`, GET/DELETE /v1/responses/{id}) as chat
completions (gateway/translation.py): `input` items, after the stored conversation that
`previous_response_id` names and `instructions`; function tools; text.format.  A stream ends
in response.completed, .incomplete (the token limit) or .failed (the target failed).  Built-in
tools, images, files and `_REFUSED` are a 400.  With `store` (the default) a response is kept
in SQLite with the chat messages up to it, for its client only; rows older than `max_age`
seconds go, then the oldest past `max_bytes`.  The file holds prompts: 0600, opened on first
use; its short calls run on the event loop.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from gateway.translation import Dialect, Item, clean, refused, sse
from myco.errors import BadRequest, NotFound

_REFUSED = ("background", "conversation", "prompt", "top_logprobs")
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
_PART = ("item_id", "content_index")  # where a message's text events apply
_SAME = {"max_output_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
         "user": "user", "stream": "stream"}  # Responses parameter -> chat parameter


class ResponseStore:
    def __init__(self, path: Path, max_age: float, max_bytes: int) -> None:
        self.path, self.max_age, self.max_bytes = path, max_age, max_bytes
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(self.path)
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, "
                             "client TEXT, created REAL, size INTEGER, body BLOB)")
        return self._db

    def put(self, response_id: str, client: str | None, response: dict[str, Any],
            messages: list[dict[str, Any]]) -> None:
        body, now = msgspec.json.encode({"response": response, "messages": messages}), time.time()
        with self.db as db:
            db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?)",
                       (response_id, client or "", now, len(body), body))
            db.execute("DELETE FROM responses WHERE created < ?", (now - self.max_age,))
            db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM (SELECT id, SUM(size) "
                       "OVER (ORDER BY created DESC, id) AS kept FROM responses) WHERE kept > ?)",
                       (self.max_bytes,))

    def get(self, response_id: str, client: str | None, param: str | None = None, *,
            delete: bool = False) -> dict[str, Any]:
        """{"response", "messages"} (forgotten, with `delete`); for an id this client has none
        of, NotFound naming `param`."""
        row = self.db.execute(
            "SELECT body FROM responses WHERE id = ? AND client = ? AND created >= ?",
            (response_id, client or "", time.time() - self.max_age)).fetchone()
        if row is None:
            raise NotFound(f"no stored response with id {response_id[:64]!r} (unknown, deleted, "
                           "expired, or made with store false)", param=param)
        if delete:
            with self.db as db:
                db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        return dict(msgspec.json.decode(row[0]))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def _text(content: Any, param: str) -> str:
    for j, part in enumerate([] if isinstance(content, str) else content):
        if part.get("type") not in ("input_text", "output_text", "refusal"):
            raise refused(f"{param}[{j}]", f"{part.get('type')!r} content (text only)")
    return content if isinstance(content, str) else \
        "".join(part.get("text") or part.get("refusal") or "" for part in content)


def messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages; a function_call joins the assistant turn before it."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}] if items else []
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind, call_id, role = item.get("type", "message"), item.get("call_id"), item.get("role")
        if kind == "message":
            out.append({"role": "system" if role == "developer" else role or "user",
                        "content": _text(item.get("content", ""), f"input[{i}].content")})
        elif kind == "function_call_output" and call_id:
            out.append({"role": "tool", "tool_call_id": call_id,
                        "content": _text(item.get("output", ""), f"input[{i}].output")})
        elif kind == "function_call" and call_id:
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": ""})
            out[-1].setdefault("tool_calls", []).append({"id": call_id, "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}})
        elif kind != "reasoning":
            raise refused(f"input[{i}]", f"a {kind!r} item (or one without call_id)")
    return out


class Responses(Dialect):
    endpoint = "responses"

    def __init__(self, store: ResponseStore) -> None:
        super().__init__()
        self.store, self.seq, self.final = store, 0, dict[str, Any]()
        self.id, self.created = "resp_" + uuid.uuid4().hex, int(time.time())
        self.error: dict[str, str] | None = None

    def chat(self, r: dict[str, Any], client: str | None) -> dict[str, Any]:
        self.request, self.client, tools = r, client, r.get("tools") or []
        for name in (name for name in _REFUSED if r.get(name)):
            raise refused(name, f"`{name}`")
        for i, tool in enumerate(tools):
            if tool.get("type") != "function":
                raise refused(f"tools[{i}]", f"a {tool.get('type')!r} tool (built-in tools)")
        choice, fmt = r.get("tool_choice"), (r.get("text") or {}).get("format") or {}
        if isinstance(choice, dict):
            if choice.get("type") != "function":
                raise refused("tool_choice", f"{choice.get('type')!r}")
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        previous = self.store.get(r["previous_response_id"], client, "previous_response_id")[
            "messages"] if r.get("previous_response_id") else []
        self.conversation = previous + messages(r.get("input") or [])
        if not self.conversation:
            raise BadRequest("input is empty", param="input")
        system = [{"role": "system", "content": r["instructions"]}] if r.get("instructions") else []
        schema = {"name": "response", **clean({k: fmt.get(k) for k in (
            "name", "schema", "description", "strict")})}
        return clean({
            **{chat: r.get(k) for k, chat in _SAME.items()}, "model": r.get("model"),
            "messages": system + self.conversation, "tool_choice": choice if tools else None,
            "tools": [{"type": "function", "function": clean({k: tool.get(k) for k in (
                "name", "description", "parameters", "strict")})} for tool in tools] or None,
            "parallel_tool_calls": r.get("parallel_tool_calls") if tools else None,
            "response_format": {"json_object": {"type": "json_object"}, "json_schema": {
                "type": "json_schema", "json_schema": schema}}.get(str(fmt.get("type"))),
            "stream_options": {"include_usage": True} if r.get("stream") else None})

    def emit(self, kind: str, **fields: Any) -> bytes:
        self.seq += 1
        return sse(kind, sequence_number=self.seq - 1, **fields)

    def at(self, *keys: str) -> dict[str, Any]:
        """Where the last item's events apply: output_index, and `keys` (item_id, content_index)."""
        where = {"item_id": self.items[-1]["key"], "content_index": 0}
        return {"output_index": len(self.items) - 1, **{k: where[k] for k in keys}}

    @staticmethod
    def item(it: Item, empty: bool = False) -> dict[str, Any]:
        """An output item as the API gives it (`empty`: a message's content not begun)."""
        if it["type"] == "call":
            return {"type": "function_call", "id": it["key"], "call_id": it["id"],
                    "name": it["name"], "arguments": it["arguments"], "status": it["status"]}
        return {"type": "message", "id": it["key"], "role": "assistant", "status": it["status"],
                "content": [] if empty else [{"type": "output_text", "text": it["text"],
                                              "annotations": []}]}

    def snapshot(self, status: str) -> dict[str, Any]:
        r, used = self.request, self.usage or {}
        p, c = used.get("prompt_tokens", 0), used.get("completion_tokens", 0)
        return {"id": self.id, "object": "response", "created_at": self.created,
                "status": status, "model": r.get("model"), "error": self.error,
                "output": [self.item(it) for it in self.items], "tools": r.get("tools") or [],
                "parallel_tool_calls": r.get("parallel_tool_calls", True),
                "tool_choice": r.get("tool_choice", "auto"), "metadata": r.get("metadata") or {},
                "text": {"format": (r.get("text") or {}).get("format") or {"type": "text"}},
                **{k: r.get(k) for k in ("instructions", "temperature", "top_p", "user",
                                         "max_output_tokens", "previous_response_id")},
                "incomplete_details": {"reason": _INCOMPLETE[self.finish or ""]}
                if status == "incomplete" else None,
                "usage": self.usage and {
                    "input_tokens": p, "output_tokens": c, "total_tokens": p + c,
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0}}}

    def start(self) -> bytes:
        return self.emit("response.created", response=self.snapshot("in_progress")) + \
            self.emit("response.in_progress", response=self.snapshot("in_progress"))

    def opened(self, it: Item) -> bytes:
        text = it["type"] == "text"
        it["key"], it["status"] = ("msg_" if text else "fc_") + uuid.uuid4().hex, "in_progress"
        part = {"type": "output_text", "text": "", "annotations": []}
        return self.emit("response.output_item.added", item=self.item(it, True), **self.at()) + (
            self.emit("response.content_part.added", part=part, **self.at(*_PART)) if text else b"")

    def delta(self, delta: str) -> bytes:
        if self.items[-1]["type"] == "text":
            return self.emit("response.output_text.delta", delta=delta, logprobs=[],
                             **self.at(*_PART))
        return self.emit("response.function_call_arguments.delta", delta=delta,
                         **self.at("item_id"))

    def closed(self, it: Item) -> bytes:
        it["status"] = "incomplete" if self.finish in _INCOMPLETE else "completed"
        done = self.item(it)
        out = self.emit("response.function_call_arguments.done", arguments=it["arguments"],
                        **self.at("item_id")) if it["type"] == "call" else \
            self.emit("response.output_text.done", text=it["text"], logprobs=[],
                      **self.at(*_PART)) + \
            self.emit("response.content_part.done", part=done["content"][0], **self.at(*_PART))
        return out + self.emit("response.output_item.done", item=done, **self.at())

    def end(self) -> bytes:
        status = "incomplete" if self.finish in _INCOMPLETE else "completed"
        self.final = self.snapshot(status)
        if self.request.get("store") is not False:  # continued by previous_response_id
            calls = [{"id": it["id"], "type": "function", "function": {
                "name": it["name"], "arguments": it["arguments"]}}
                for it in self.items if it["type"] == "call"]
            text = "".join(it["text"] for it in self.items if it["type"] == "text")
            reply = clean({"role": "assistant", "content": text, "tool_calls": calls or None})
            self.store.put(self.id, self.client, self.final, [*self.conversation, reply])
        return self.emit(f"response.{status}", response=self.final)

    def fail(self, message: str) -> bytes:
        self.error = {"code": "server_error", "message": message}
        return self.emit("response.failed", response=self.snapshot("failed"))

    def result(self) -> dict[str, Any]:
        return self.final

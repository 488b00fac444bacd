"""Tool calls and structured output from local models: grammars, and reading calls back.

`plan(request)` decides how a chat request is generated:

    tools, tool_choice "required" or a named function -> "forced": the output must be
        <tool_call>{"name": N, "arguments": {...}}</tool_call>, repeated up to
        MAX_PARALLEL times when parallel_tool_calls; the arguments follow the function's JSON
        schema (llama.cpp grammar from JSON schema), so they always parse and validate
    tools, tool_choice "auto" (or absent) -> "auto": the same calls, or text that does not
        start with "<"; the model chooses by its first character
    response_format json_object / json_schema -> "json": output constrained to JSON / schema
    otherwise -> "text"

`CallParser` turns generated text into content and tool-call events as it arrives; the
streaming and non-streaming answers are both built from its events, so they cannot differ.
The first call streams as it is generated; later (parallel) calls are released whole once
complete, so a call cut off by the token limit after a complete one is dropped rather than
returned with arguments that do not parse.  Small models tend to repeat calls until the limit.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import msgspec

from nodeagent.runner.wire import ChatRequest, Tool

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL = 4
Mode = Literal["text", "json", "forced", "auto"]

# The head of one call, up to the first character of its arguments.
_HEAD = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,'
                   r'\s*"arguments"\s*:\s*(?=\S)')


def _gbnf(schema: dict[str, Any], root: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    rules = json_schema_to_gbnf(json.dumps(schema))
    return re.sub(r"^root ::=", f"{root} ::=", rules, count=1, flags=re.M)


def call_schema(tools: list[Tool]) -> dict[str, Any]:
    options = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                 "arguments": t.function.parameters},
                "required": ["name", "arguments"]} for t in tools]
    return options[0] if len(options) == 1 else {"oneOf": options}


def plan(request: ChatRequest) -> tuple[Mode, str | None]:
    """The generation mode and its GBNF grammar (None: unconstrained)."""
    tools = request.tools if request.tool_choice != "none" else None
    if tools:
        if (named := request.chosen_function) is not None:
            tools = [t for t in tools if t.function.name == named]
        more = f'( "\\n"? calls-one ){{0,{MAX_PARALLEL - 1}}}' if request.parallel_tool_calls \
            else ""
        rules = (_gbnf(call_schema(tools), "call")
                 + f'\ncalls-one ::= "{CALL_OPEN}" call "{CALL_CLOSE}"'
                 + f"\ncalls ::= calls-one {more}")
        if request.tool_choice == "required" or named is not None:
            return "forced", rules + "\nroot ::= calls"
        return "auto", rules + "\ntext ::= [^<]+\nroot ::= calls | text calls?"
    if (fmt := request.response_format) is not None and fmt.type == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF

        return "json", JSON_GBNF
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        return "json", _gbnf(fmt.json_schema.schema, "root")
    return "text", None


class Event(msgspec.Struct, frozen=True):
    kind: Literal["content", "call", "args"]
    text: str
    index: int = 0


class CallParser:
    """Feed generated text piece by piece; get content and tool-call events back."""

    def __init__(self, mode: Mode) -> None:
        self.buf, self.state = "", {"auto": "undecided", "forced": "between"}.get(mode, "plain")
        self.pos = 0  # how far buf has been turned into events
        self.calls = self._depth = 0
        self._in_string = self._escaped = False
        self._held: list[Event] = []  # events of a parallel call, until it is complete

    def feed(self, piece: str) -> list[Event]:
        self.buf += piece
        events: list[Event] = []
        while True:
            before = (self.state, self.pos)
            events += self._step()
            if (self.state, self.pos) == before:
                return events

    def _step(self) -> list[Event]:
        if self.state == "undecided":
            if text := self.buf.lstrip():
                self.state = "between" if text[0] == "<" else "content"
            return []
        if self.state in ("plain", "content"):  # "plain": no tools offered, all text is content
            # "content": the grammar keeps "<" out of text, so a "<" opens a call
            end = self.buf.find("<", self.pos) if self.state == "content" else -1
            if end >= 0:
                self.state = "between"
            end = len(self.buf) if end < 0 else end
            text, self.pos = self.buf[self.pos:end], end
            return [Event("content", text)] if text else []
        if self.state == "between":
            if (head := _HEAD.search(self.buf, self.pos)) is None:
                return []
            self.state, self.pos = "args", head.end()
            self._depth, self._in_string, self._escaped = 0, False, False
            return self._release([Event("call", json.loads(f'"{head.group(1)}"'), self.calls)])
        return self._args()

    def _release(self, events: list[Event], complete: bool = False) -> list[Event]:
        if self.calls == 0:
            return events
        self._held += events
        released, self._held = (self._held, []) if complete else ([], self._held)
        return released

    @property
    def complete_calls(self) -> int:
        """Calls that were read whole (a cut-off parallel call is not counted, nor sent)."""
        return self.calls

    def _args(self) -> list[Event]:
        start, end = self.pos, None
        for i, c in enumerate(self.buf[start:], start):
            if self._escaped:
                self._escaped = False
            elif self._in_string:
                self._escaped = c == "\\"
                self._in_string = c != '"'
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    break
        self.pos = stop = end if end is not None else len(self.buf)
        events = self._release([Event("args", self.buf[start:stop], self.calls)]
                               if stop > start else [], complete=end is not None)
        if end is not None:
            self.state, self.calls = "between", self.calls + 1
        return events

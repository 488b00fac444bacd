"""Chat prompts: messages (with tools, tool calls and tool results) rendered for the model.

A model whose GGUF carries `tokenizer.chat_template` is rendered with that Jinja template
(llama-cpp-python's Jinja2ChatFormatter; `tools` is passed to it).  The default Gemma 3 270M
GGUF has none, so Gemma-family models without one get Gemma's documented turn format:

    <start_of_turn>user
    {system text, then the first user text}<end_of_turn>
    <start_of_turn>model
    {reply}<end_of_turn>

Gemma has no system or tool role and needs user/model to alternate, so system and developer
text opens the first user turn (as Gemma's own template does), tool results become user turns
`<tool_response name="...">...</tool_response>`, consecutive turns of one role are merged, and
tool calls are written as `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, the form
`nodeagent.runner.tools` constrains the model to; the first user turn lists any tools as JSON.
"""

from __future__ import annotations

import json
from typing import Any

from nodeagent.runner.tools import CALL_CLOSE, CALL_OPEN
from nodeagent.runner.wire import Message, Tool

GEMMA_STOP = "<end_of_turn>"


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content or ""


def tool_preamble(tools: list[Tool]) -> str:
    listed = json.dumps([{"name": t.function.name, "description": t.function.description or "",
                          "parameters": t.function.parameters} for t in tools])
    return ("You can call these functions. To call one, answer with "
            f'{CALL_OPEN}{{"name": ..., "arguments": {{...}}}}{CALL_CLOSE} and nothing else; '
            f"each result comes back as <tool_response>.\n<tools>\n{listed}\n</tools>\n\n")


def render_call(call: dict[str, Any]) -> str:
    function = call.get("function", {})
    return f'{CALL_OPEN}{{"name": {json.dumps(function.get("name", ""))}, ' \
           f'"arguments": {function.get("arguments") or "{}"}}}{CALL_CLOSE}'


def gemma_turns(messages: list[Message], tools: list[Tool] | None) -> list[tuple[str, str]]:
    """(role, text) turns, alternating user/model, system text folded into the first user."""
    system = "\n\n".join(_text(m.content) for m in messages if m.role in ("system", "developer"))
    prefix = (tool_preamble(tools) if tools else "") + (system + "\n\n" if system else "")
    turns: list[tuple[str, str]] = []
    for m in messages:
        if m.role in ("system", "developer"):
            continue
        if m.role == "assistant":
            role, text = "model", _text(m.content) + "".join(map(render_call, m.tool_calls or []))
        elif m.role == "tool":
            role, text = "user", f'<tool_response name="{m.name or m.tool_call_id or ""}">' \
                                 f"{_text(m.content)}</tool_response>"
        else:
            role, text = "user", _text(m.content)
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    turns[0] = ("user", prefix + turns[0][1])
    return turns


def render_gemma(messages: list[Message], tools: list[Tool] | None) -> str:
    return "".join(f"<start_of_turn>{role}\n{text}{GEMMA_STOP}\n"
                   for role, text in gemma_turns(messages, tools)) + "<start_of_turn>model\n"


def render_template(template: str, bos: str, eos: str, messages: list[Any],
                    tools: list[Tool] | None) -> tuple[str, list[str]]:
    """A model's own Jinja chat template: (prompt, stop strings)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                    add_generation_prompt=True)
    listed: list[Any] = [{"type": "function", "function": {
        "name": t.function.name, "description": t.function.description,
        "parameters": t.function.parameters}} for t in tools or ()]
    result = formatter(messages=messages, tools=listed or None)
    stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
    return result.prompt, stop

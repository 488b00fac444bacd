"""Prompt rendering and tool-call parsing: pure, table-driven."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from nodeagent.runner import chat, tools, wire


def request(**fields: Any) -> wire.ChatRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return wire.decode(json.dumps(body).encode(), wire.ChatRequest)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}


def test_gemma_conversation_with_system_tools_and_results() -> None:
    body = request(tools=[TOOL], messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Call f."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
        {"role": "tool", "tool_call_id": "call_2", "content": "3"},
    ])
    prompt = chat.render_gemma(body.messages, body.tools)
    preamble = chat.tool_preamble(body.tools or [])
    assert prompt == (
        f"<start_of_turn>user\n{preamble}Be brief.\n\nCall f.<end_of_turn>\n"
        '<start_of_turn>model\n<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
        "<end_of_turn>\n"
        '<start_of_turn>user\n<tool_response name="call_1">2</tool_response>\n'
        '<tool_response name="call_2">3</tool_response><end_of_turn>\n'
        "<start_of_turn>model\n")


def test_gemma_needs_a_user_turn_first() -> None:
    body = request(messages=[{"role": "assistant", "content": "Hello."}])
    assert chat.render_gemma(body.messages, None).startswith(
        "<start_of_turn>user\n<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n")


@pytest.mark.parametrize(("fields", "mode"), [
    ({}, "text"),
    ({"tools": [TOOL]}, "auto"),
    ({"tools": [TOOL], "tool_choice": "auto"}, "auto"),
    ({"tools": [TOOL], "tool_choice": "none"}, "text"),
    ({"tools": [TOOL], "tool_choice": "required"}, "forced"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "forced"),
    ({"response_format": {"type": "json_object"}}, "json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object"}}}}, "json"),
    ({"response_format": {"type": "text"}}, "text"),
])
def test_plan_modes(fields: dict[str, Any], mode: str) -> None:
    planned, grammar = tools.plan(request(**fields))
    assert planned == mode
    assert (grammar is None) == (mode == "text")


def test_parallel_calls_are_bounded_in_the_grammar() -> None:
    _, grammar = tools.plan(request(tools=[TOOL], tool_choice="required"))
    assert f"{{0,{tools.MAX_PARALLEL - 1}}}" in (grammar or "")
    _, single = tools.plan(request(tools=[TOOL], tool_choice="required",
                                   parallel_tool_calls=False))
    assert "{0," not in (single or "").split("calls ::=")[1]


TEXT = ('<tool_call>{ "name": "f", "arguments": {"x": 1, "s": "a}\\"b", "l": [1, {"y": 2}]}}'
        '</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "h", "arguments": {"cut": "of')


def collapse(events: list[tools.Event]) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    for e in events:
        if out and out[-1][0] == e.kind and out[-1][2] == e.index and e.kind != "call":
            out[-1] = (e.kind, out[-1][1] + e.text, e.index)
        else:
            out.append((e.kind, e.text, e.index))
    return out


def test_parser_whole_and_any_split_agree() -> None:
    whole = tools.CallParser("forced")
    expected = collapse(whole.feed(TEXT))
    assert expected == [("call", "f", 0), ("args", '{"x": 1, "s": "a}\\"b", "l": [1, {"y": 2}]}',
                                             0),
                        ("call", "g", 1), ("args", "{}", 1)]  # the cut-off "h" is dropped
    assert whole.complete_calls == 2
    rng = random.Random(1)
    for _ in range(50):
        parser, events, i = tools.CallParser("forced"), [], 0
        while i < len(TEXT):
            step = rng.randint(1, 7)
            events += parser.feed(TEXT[i:i + step])
            i += step
        assert collapse(events) == expected


def test_auto_text_then_a_call() -> None:
    parser = tools.CallParser("auto")
    events = parser.feed('Let me look. <tool_call>{"name": "f", "arguments": {"x": 2}}</tool_call>')
    assert collapse(events) == [("content", "Let me look. ", 0), ("call", "f", 0),
                                ("args", '{"x": 2}', 0)]


@pytest.mark.parametrize("mode", ["text", "json"])
def test_without_tools_a_call_shaped_text_stays_content(mode: tools.Mode) -> None:
    parser = tools.CallParser(mode)
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert collapse(parser.feed(text)) == [("content", text, 0)]


def test_a_cut_off_first_call_is_kept_with_length() -> None:
    parser = tools.CallParser("forced")
    assert collapse(parser.feed('<tool_call>{"name": "f", "arguments": {"x": ')) == [
        ("call", "f", 0), ("args", '{"x": ', 0)]
    assert parser.complete_calls == 0


def test_a_models_own_template_is_used_with_tools() -> None:
    template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
                "{% if tools %}TOOLS:{{ tools | map(attribute='function.name') | join(',') }}"
                "{% endif %}{% if add_generation_prompt %}[assistant]{% endif %}")
    body = request(tools=[TOOL], messages=[{"role": "developer", "content": "Be brief."},
                                           {"role": "user", "content": "hi"}])
    prompt, stop = chat.render_template(template, "<s>", "</s>",
                                        wire.message_dicts(body.messages), body.tools)
    assert prompt == "[system]Be brief.\n[user]hi\nTOOLS:f[assistant]"
    assert stop == ["</s>"]

"""Tool calling and structured output through the gateway, with the openai client and the
real Gemma 3 270M.  The assertions are about the protocol, not about how clever the model is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import MODEL_ID, check_answer
from tests.procs import Proc

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 24}},
        "required": ["timezone"]}
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone",
                                      "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(gateway: Proc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="local", max_retries=0,
                       timeout=120) as client:
        yield client


def check_calls(message: Any) -> list[tuple[str, str]]:
    assert message.tool_calls, message
    out = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        out.append((call.function.name, call.function.arguments))
    return out


def test_required_tool_call_validates_against_its_schema(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=96, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    check_calls(choice.message)


def test_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=ASK, tools=TOOLS, max_tokens=96, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False)
    calls = check_calls(reply.choices[0].message)
    assert [name for name, _ in calls] == ["get_time"]


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS,
                                           tool_choice="none", max_tokens=12, temperature=0)
    assert reply.choices[0].message.tool_calls is None
    check_answer(reply, 12)


def test_auto_never_leaks_a_call_into_content(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS,
                                           max_tokens=64, temperature=0)
    message = reply.choices[0].message
    assert "<tool_call>" not in (message.content or "")
    if message.tool_calls:
        check_calls(message)
        assert reply.choices[0].finish_reason == "tool_calls"
    else:
        check_answer(reply, 64)


def test_json_schema_output(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30},
                                               "confidence": {"type": "integer"}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=ASK, max_tokens=64, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)


def test_json_object_output(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=48,
                                           temperature=0, response_format={"type": "json_object"})
    text = check_answer(reply, 48)
    if reply.choices[0].finish_reason == "stop":
        assert type(json.loads(text)) is dict
    else:  # a 270M model rarely closes its object: what came is JSON, cut short
        assert text.startswith("{") and json_prefix(text), text


def json_prefix(text: str) -> bool:
    """Whether `text` is the beginning of a JSON document: parsing fails only at its end."""
    for tail in ("", '"'):  # (an unclosed string is reported where it starts)
        try:
            json.loads(text + tail)
        except json.JSONDecodeError as error:
            if error.pos == len(text + tail):
                return True
        else:
            return True
    return False


def test_json_prefix() -> None:
    assert json_prefix('{\n  "city": "Par') and json_prefix('{"a": [1, 2') and json_prefix("{")
    assert not json_prefix('{"a": 1}}') and not json_prefix("Paris {")


def test_streamed_tool_calls_reassemble_into_the_whole_answer(client: openai.OpenAI) -> None:
    kwargs: Any = {"model": MODEL_ID, "messages": ASK, "tools": TOOLS, "seed": 7,
                   "tool_choice": "required", "max_tokens": 96, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += (delta.function and delta.function.name) or ""
                call["arguments"] += (delta.function and delta.function.arguments) or ""
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_follow_up_turn_with_tool_result(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=96,
                                           temperature=0).choices[0].message
    call = (first.tool_calls or [])[0]
    messages: Any = [*ASK, first.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 18}'}]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS,
                                           tool_choice="none", max_tokens=16, temperature=0)
    assert reply.choices[0].message.tool_calls is None
    check_answer(reply, 16)


@pytest.mark.parametrize(("extra", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logprobs": True}, "logprobs"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools[0].function"),
])
def test_what_the_model_cannot_do_is_a_400(gateway: Proc, extra: dict[str, Any],
                                           param: str) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions", timeout=30,
                          json={"model": MODEL_ID, "messages": ASK, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param

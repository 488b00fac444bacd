"""Anthropic's Messages API through the gateway to a real node, with the official `anthropic`
client (as Claude Code and the Anthropic SDKs speak it: `x-api-key`, no /v1 in the base URL).

SmolLM2-135M-Instruct answers; every answer and stream event is checked against the SDK's own
types (tests/sdk_shapes.py), and each request's route headers and audit entry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from anthropic.types import ErrorResponse, Message, MessageTokensCount, RawMessageStreamEvent

from tests.conftest import SMOL_ID
from tests.procs import Proc
from tests.sdk_shapes import audit_entry, sse, strict

QUESTION = [{"role": "user", "content": "What color is the sky? Answer in one word."}]
WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
# This SDK has no `temperature` parameter any more; the API (and the gateway) still take it.
ASK: dict[str, Any] = {"model": SMOL_ID, "max_tokens": 48, "extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def client(chat_gateway: Proc) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=chat_gateway.url, api_key="local", max_retries=0,
                             timeout=120) as client:
        yield client


def routed(gateway: Proc, headers: Any, status: int = 200) -> dict[str, Any]:
    assert headers["x-myco-node"] == "local" and headers["x-myco-rule"] == "routes[0]"
    entry = audit_entry(gateway, headers["x-request-id"])
    assert (entry["endpoint"], entry["target"], entry["status"]) == ("messages", "local", status)
    return entry


def create(client: anthropic.Anthropic, gateway: Proc, **kwargs: Any) -> Message:
    raw = client.messages.with_raw_response.create(**{**ASK, **kwargs})
    routed(gateway, raw.headers)
    message: Message = strict(Message, raw.json())
    assert message.model == SMOL_ID and message.role == "assistant"
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 48
    return message


def test_plain_and_streamed_answers_agree(client: anthropic.Anthropic,
                                          chat_gateway: Proc) -> None:
    whole = create(client, chat_gateway, messages=QUESTION, system="Be brief.")
    assert whole.stop_reason == "end_turn"
    assert [block.type for block in whole.content] == ["text"]
    text = whole.content[0].text  # type: ignore[union-attr]

    with client.messages.with_streaming_response.create(
            messages=QUESTION, system="Be brief.", stream=True, **ASK) as raw:
        routed(chat_gateway, raw.headers)
        events = sse(raw.iter_lines())
    assert [name for name, _ in events] == [data["type"] for _, data in events]
    for _, data in events:
        strict(RawMessageStreamEvent, data)
    kinds = [data["type"] for _, data in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}

    # The SDK's own stream helper assembles the same message.
    with client.messages.stream(messages=QUESTION,  # type: ignore[arg-type]
                                system=[{"type": "text", "text": "Be brief."}], **ASK) as stream:
        assert "".join(stream.text_stream) == text
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.content[0].text == text  # type: ignore
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens > 0


def test_tool_use_then_tool_result(client: anthropic.Anthropic, chat_gateway: Proc) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    asked = create(client, chat_gateway, messages=ask, tools=[WEATHER],
                   tool_choice={"type": "tool", "name": "get_weather"})
    assert asked.stop_reason == "tool_use"
    use = asked.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather"
    assert isinstance(use.input["city"], str)  # type: ignore[index]

    with client.messages.stream(messages=ask, tools=[WEATHER],  # type: ignore[arg-type]
                                tool_choice={"type": "any"}, **ASK) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert streamed.content[-1].input == use.input  # type: ignore[union-attr]

    answer = create(client, chat_gateway, tools=[WEATHER], tool_choice={"type": "none"},
                    messages=[*ask, {"role": "assistant", "content": [
                        block.model_dump() for block in asked.content]},
                        {"role": "user", "content": [{"type": "tool_result",
                                                      "tool_use_id": use.id,
                                                      "content": "sunny, 21 C"}]}])
    assert answer.stop_reason == "end_turn"
    assert [block.type for block in answer.content] == ["text"]


def test_structured_output(client: anthropic.Anthropic, chat_gateway: Proc) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "country": {"type": "string"}},
              "required": ["name", "country"], "additionalProperties": False}
    message = create(client, chat_gateway, extra_body={"temperature": 0, "output_config": {
        "format": {"type": "json_schema", "schema": schema}}},
        messages=[{"role": "user", "content": "Name a city in France."}])
    city = json.loads(message.content[0].text)  # type: ignore[union-attr]
    assert set(city) == {"name", "country"}


def test_count_tokens(client: anthropic.Anthropic, chat_gateway: Proc) -> None:
    raw = client.messages.with_raw_response.count_tokens(model=SMOL_ID, messages=QUESTION)
    routed(chat_gateway, raw.headers)
    short = strict(MessageTokensCount, raw.json()).input_tokens
    longer = client.messages.count_tokens(model=SMOL_ID, messages=[  # type: ignore[list-item]
        *QUESTION, {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And at night?"}]).input_tokens
    assert 0 < short < longer
    # What the count says is what the model was given.
    assert create(client, chat_gateway, messages=QUESTION).usage.input_tokens == short


def test_errors_are_in_anthropics_shape(client: anthropic.Anthropic, chat_gateway: Proc) -> None:
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(**{**ASK, "model": "no-such-model"}, messages=QUESTION)
    body = strict(ErrorResponse, unknown.value.body)
    assert body.error.type == "not_found_error" and "no-such-model" in body.error.message
    assert unknown.value.response.headers["x-myco-rule"] == "routes[0]"

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AA=="}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(**ASK, messages=[{"role": "user", "content": [image]}])
    body = strict(ErrorResponse, refused.value.body)
    assert body.error.type == "invalid_request_error"
    assert body.error.message.startswith("messages[0].content[0]: 'image' in a user message")
    entry = audit_entry(chat_gateway, refused.value.response.headers["x-request-id"])
    assert (entry["endpoint"], entry["status"]) == ("messages", 400)

    with pytest.raises(anthropic.BadRequestError) as server_tool:
        client.messages.create(**ASK, messages=QUESTION, tools=[
            {"type": "web_search_20250305", "name": "web_search"}])  # type: ignore[list-item]
    assert "tools[0]" in json.dumps(server_tool.value.body)

"""The Responses API through the gateway to a real node, with the official `openai` client and
the OpenAI Agents SDK left on its defaults.

SmolLM2-135M-Instruct answers (its own ChatML template, `chat_models_dir`); every answer and
stream event is checked against the SDK's own types (tests/sdk_shapes.py), and each request's
route headers and audit entry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai import omit
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel

from tests.conftest import SMOL_ID
from tests.procs import Proc
from tests.sdk_shapes import audit_entry, sse, strict

QUESTION = "What color is the sky? Answer in one word."  # SmolLM2 answers it in ~20 tokens
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}
ASK = {"model": SMOL_ID, "max_output_tokens": 48, "temperature": 0}


@pytest.fixture(scope="module")
def client(chat_gateway: Proc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=chat_gateway.url + "/v1", api_key="local", max_retries=0,
                       timeout=120) as client:
        yield client


def routed(gateway: Proc, headers: Any, status: int = 200) -> dict[str, Any]:
    """The route headers of an answer from the chat node, and its audit entry."""
    assert headers["x-myco-node"] == "local" and headers["x-myco-rule"] == "routes[0]"
    entry = audit_entry(gateway, headers["x-request-id"])
    assert (entry["endpoint"], entry["target"], entry["status"]) == ("responses", "local", status)
    return entry


def create(client: openai.OpenAI, gateway: Proc, **kwargs: Any) -> Response:
    raw = client.responses.with_raw_response.create(**{**ASK, **kwargs})
    routed(gateway, raw.headers)
    strict(Response, raw.http_response.json())
    response = raw.parse()
    assert response.status == "completed" and response.model == SMOL_ID
    assert response.usage is not None and 0 < response.usage.output_tokens <= 48
    return response


def test_plain_and_streamed_answers_agree(client: openai.OpenAI, chat_gateway: Proc) -> None:
    whole = create(client, chat_gateway, input=QUESTION, metadata={"case": "plain"})
    assert [item.type for item in whole.output] == ["message"]
    assert whole.output_text and whole.metadata == {"case": "plain"}

    with client.responses.with_streaming_response.create(
            input=QUESTION, stream=True, **ASK) as raw:
        routed(chat_gateway, raw.headers)
        events = sse(raw.iter_lines())
    # Each event is named by its type, numbered in order, known to the SDK, and the SDK's own
    # accumulator takes the sequence (it raises on any event out of place).
    assert [name for name, _ in events] == [data["type"] for _, data in events]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    for _, data in events:
        state.handle_event(strict(ResponseStreamEvent, data))
    kinds = [data["type"] for _, data in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    final = state._completed_response
    assert final is not None and final.output_text == whole.output_text
    deltas = "".join(d["delta"] for _, d in events if d["type"] == "response.output_text.delta")
    assert deltas == whole.output_text


def test_a_function_call_and_its_output_fed_back(client: openai.OpenAI,
                                                 chat_gateway: Proc) -> None:
    question = "What is the weather in Paris?"
    asked = create(client, chat_gateway, input=question, tools=[WEATHER],
                   tool_choice="required")
    (call,) = asked.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id and isinstance(json.loads(call.arguments)["city"], str)

    with client.responses.stream(input=question, tools=[WEATHER],  # type: ignore[arg-type]
                                 tool_choice="required", **ASK) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response().output[0]
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    assert streamed.type == "function_call" and streamed.arguments == call.arguments

    answer = create(client, chat_gateway, tools=[WEATHER], tool_choice="none", input=[
        {"role": "user", "content": question}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert [item.type for item in answer.output] == ["message"] and answer.output_text


class City(BaseModel):
    name: str
    country: str


def test_json_schema_text_format(client: openai.OpenAI, chat_gateway: Proc) -> None:
    parsed = client.responses.parse(input="Name a city in France.", text_format=City, **ASK)
    assert isinstance(parsed.output_parsed, City) and parsed.output_parsed.name
    assert parsed.text is not None and parsed.text.format is not None
    assert parsed.text.format.type == "json_schema"
    # json_object: JSON of any length (a small model may run to the limit), as an object
    raw = client.responses.with_raw_response.create(
        input="Name a city in France, as JSON.", text={"format": {"type": "json_object"}}, **ASK)
    routed(chat_gateway, raw.headers)
    assert strict(Response, raw.http_response.json()).output_text.lstrip().startswith("{")


def test_previous_response_id_continues_a_stored_conversation(
        client: openai.OpenAI, chat_gateway: Proc) -> None:
    first = create(client, chat_gateway, input="My name is Ada.")
    raw = client.responses.with_raw_response.create(
        input="What is my name?", previous_response_id=first.id, **ASK)
    second = raw.parse()
    assert second.previous_response_id == first.id
    # The node was sent the stored turns, then the new one (the audit log keeps prompts here).
    sent = json.loads(routed(chat_gateway, raw.headers)["body"])["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[0]["content"] == "My name is Ada."
    assert sent[1]["content"] == first.output_text

    stored = strict(Response, client.responses.with_raw_response.retrieve(
        first.id).http_response.json())
    assert stored.id == first.id and stored.output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.create(input="And now?", previous_response_id=first.id, **ASK)
    assert gone.value.body["param"] == "previous_response_id"  # type: ignore[index]

    unstored = client.responses.create(input="Hi.", store=False, **ASK)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[0]"),
    ({"background": True}, "background"),
    ({"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,AA=="}]}]},
     "input[0].content[0]"),
])
def test_what_cannot_be_served_is_a_400_naming_it(client: openai.OpenAI, kwargs: dict[str, Any],
                                                  param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**{"input": "hi", **ASK, **kwargs})
    assert refused.value.body["param"] == param  # type: ignore[index]


def test_openai_agents_sdk_with_its_defaults(chat_gateway: Proc,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the two variables set: the SDK's default model class, so the Responses API; a
    run with one function tool completes (an instruct model: the SDK takes a response cut
    at max_output_tokens, `incomplete`, as a failure)."""
    import asyncio
    import dataclasses

    from agents import Agent, ModelSettings, RunConfig, RunHooks, Runner, function_tool

    monkeypatch.setenv("OPENAI_BASE_URL", chat_gateway.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "local")
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return "sunny, 21 C"

    class AnswerAfterTheTool(RunHooks[Any]):  # as in tests/test_agents.py: a small model
        async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: str) -> None:
            agent.model_settings = dataclasses.replace(agent.model_settings, tool_choice="none")

    agent = Agent(name="weather", instructions="Answer with the weather tool.",
                  tools=[get_weather], model=SMOL_ID,
                  model_settings=ModelSettings(tool_choice="required", max_tokens=64,
                                               temperature=0), reset_tool_choice=False)
    audit = chat_gateway.audit_path  # type: ignore[attr-defined]
    before = len(audit.read_text().splitlines())
    result = asyncio.run(Runner.run(  # tracing would export to OpenAI's servers: off
        agent, "What is the weather in Paris?", max_turns=4, hooks=AnswerAfterTheTool(),
        run_config=RunConfig(tracing_disabled=True)))
    assert len(calls) >= 1 and all(isinstance(c, str) for c in calls)
    kinds = [item.type for item in result.new_items]
    assert kinds[0] == "tool_call_item" and "tool_call_output_item" in kinds
    assert kinds[-1] == "message_output_item" and isinstance(result.final_output, str)
    entries = [json.loads(line) for line in audit.read_text().splitlines()[before:]]
    assert len(entries) >= 2
    assert all(e["endpoint"] == "responses" and e["status"] == 200 for e in entries)

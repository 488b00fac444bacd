"""Agent frameworks, unchanged, through the gateway against the bundled Gemma 3 270M:
a tool is called, its result goes back to the model, a final answer comes."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from tests.conftest import MODEL_ID
from tests.procs import Proc

QUESTION = "What is the weather in Paris?"


def test_openai_agents_sdk_loop(gateway: Proc) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        RunConfig,
        RunHooks,
        Runner,
        function_tool,
    )
    from openai import AsyncOpenAI

    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return "sunny, 21 C"

    class AnswerAfterTheTool(RunHooks[Any]):
        """A 270M base model left on "auto" keeps calling: drive it like a small model,
        a call on the first turn, an answer after the tool's result."""

        async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: str) -> None:
            agent.model_settings = dataclasses.replace(agent.model_settings, tool_choice="none")

    async def go() -> Any:
        client = AsyncOpenAI(base_url=gateway.url + "/v1", api_key="local", max_retries=0)
        agent = Agent(
            name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
            model=OpenAIChatCompletionsModel(model=MODEL_ID, openai_client=client),
            model_settings=ModelSettings(tool_choice="required", max_tokens=64,
                                         temperature=0), reset_tool_choice=False)
        try:
            # tracing would export to OpenAI's servers: nothing leaves this machine
            return await Runner.run(agent, QUESTION, max_turns=4, hooks=AnswerAfterTheTool(),
                                    run_config=RunConfig(tracing_disabled=True))
        finally:
            await client.close()

    result = asyncio.run(go())
    assert calls and set(calls) == {"Paris"}  # the first turn's calls, then tools are off
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item"] * len(calls) + ["tool_call_output_item"] * len(calls) \
        + ["message_output_item"], kinds
    assert result.new_items[len(calls)].output == "sunny, 21 C"
    assert result.final_output and result.final_output == \
        result.new_items[-1].raw_item.content[0].text


def test_langchain_bind_tools_loop(gateway: Proc) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(model=MODEL_ID, base_url=gateway.url + "/v1", api_key="local",
                     temperature=0, max_tokens=64, max_retries=0)
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage(QUESTION)
    asked = bound.invoke([question])
    assert asked.tool_calls and asked.tool_calls[0]["name"] == "get_weather"
    assert asked.tool_calls[0]["args"] == {"city": "Paris"}
    # The same call, streamed, aggregates to the same tool call.
    streamed: Any = None
    for chunk in bound.stream([question]):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == \
        [(c["name"], c["args"]) for c in asked.tool_calls]

    call = asked.tool_calls[0]
    result = get_weather.invoke(call["args"])
    final = llm.bind_tools([get_weather], tool_choice="none").invoke(
        [question, asked, ToolMessage(content=result, tool_call_id=call["id"])])
    assert final.content and type(final.content) is str and not final.tool_calls
    used = final.usage_metadata["output_tokens"]  # type: ignore[index]
    assert final.response_metadata["finish_reason"] == ("length" if used == 64 else "stop")

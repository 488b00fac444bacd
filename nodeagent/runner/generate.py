"""Completions from a loaded llama.cpp model: prompt, grammar, sampler, OpenAI-shaped answers.

`prepare` does everything that can refuse a request (context, token budget, grammar) before
any token is generated; `sampler` makes its sampler chain; the engine (runner/engine.py)
generates; the functions below shape its events into answers.  A chat's raw text goes
through `tools.CallParser`; the non-streaming answer and the streamed chunks are both
assembled from its events, so a stream reassembles into exactly the whole answer.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from myco.errors import BadRequest
from nodeagent.runner import chat, tools, wire
from nodeagent.runner.engine import Finish
from nodeagent.runner.wire import ChatRequest, CompletionRequest, message_dicts

Events = AsyncIterator[str | Finish]  # a request's text pieces, then its Finish
Chunks = AsyncIterator[dict[str, Any]]

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class Prepared(msgspec.Struct, frozen=True):
    prompt: list[int]
    stop: list[str]
    max_tokens: int
    mode: tools.Mode = "text"
    sampler: Any = None  # the request's sampler chain (`sampler`), used once


def prepare(model: Any, n_ctx: int, body: ChatRequest | CompletionRequest) -> Prepared:
    """Render and tokenize the prompt, decide the token budget, make the sampler chain.

    BadRequest naming the parameter when the prompt leaves no room in the context, or when no
    grammar can be built from the tools or the schema (which would crash the process later).
    """
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    param = "prompt"
    if isinstance(body, CompletionRequest):
        text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    else:
        (text, own_stop), param = _render(model, body), "messages"
        stop = [*own_stop, *stop]
    prompt = model.tokenize(text.encode(), True, True) or [model.token_bos()]
    asked = wire.asked_tokens(body, n_ctx)
    if len(prompt) >= n_ctx:
        wanted = "the rest of the context" if asked is None else f"{asked} more"
        raise BadRequest(f"the prompt is {len(prompt)} tokens and the context {n_ctx}: no room "
                         f"for the answer ({wanted} asked); shorten the prompt", param=param)
    room = n_ctx - len(prompt)
    mode, grammar = _grammar(model, body)
    return Prepared(prompt, stop, room if asked is None else min(asked, room), mode,
                    sampler(model, body, grammar))


def _render(model: Any, body: ChatRequest) -> tuple[str, list[str]]:
    metadata = model.metadata()
    template = metadata.get("tokenizer.chat_template")
    if template is None and metadata.get("general.architecture", "").startswith("gemma"):
        return chat.render_gemma(body.messages, body.tools), [chat.GEMMA_STOP]
    text = model.token_get_text
    return chat.render_template(template or CHATML, text(model.token_bos()),
                                text(model.token_eos()), message_dicts(body.messages),
                                body.tools)


# A grammar element that matches only NUL makes llama.cpp throw at the first token (abort);
# a NUL character itself would cut the C string short.
_NUL = re.compile(r"(?<!-)\\(?:x00|u0000|U00000000)(?!-)|-\\(?:x00|u0000|U00000000)")


def _grammar(model: Any, body: ChatRequest | CompletionRequest) -> tuple[tools.Mode, Any]:
    """tools.plan, and llama.cpp's grammar sampler made from it; every failure a BadRequest
    (llama.cpp would crash on it later)."""
    import llama_cpp

    if isinstance(body, CompletionRequest):
        return "text", None

    param = "tools" if body.tools and body.tool_choice != "none" \
        else "response_format.json_schema.schema"
    try:
        mode, grammar = tools.plan(body)
    except Exception as exc:  # the converter's asserts and lookups, on input it did not expect
        raise BadRequest(f"no grammar can be made from {param}: "
                         f"{type(exc).__name__}: {str(exc)[:200]}", param=param) from None
    if grammar is None:
        return mode, None
    sampler = None if "\x00" in grammar or _NUL.search(grammar) else \
        llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    if not sampler:
        raise BadRequest(f"the grammar made from {param} is refused by llama.cpp (strings with "
                         '" or NUL are not supported)', param=param)
    return mode, sampler


def sampler(model: Any, body: ChatRequest | CompletionRequest, grammar: Any = None) -> Any:
    """The request's sampler chain, in llama-cpp-python's order and with its defaults:
    penalties, grammar, then greedy (temperature 0) or top-k 40, top-p, min-p 0.05,
    temperature (0.8 when not given) and a draw seeded by `seed`."""
    import llama_cpp
    from llama_cpp import _internals

    chain = _internals.LlamaSampler()  # type: ignore[no-untyped-call]
    if body.presence_penalty or body.frequency_penalty:
        chain.add_penalties(model.n_vocab(), 64, 1.0, body.frequency_penalty or 0.0,
                            body.presence_penalty or 0.0)
    if grammar is not None:  # the chain owns it from here
        llama_cpp.llama_sampler_chain_add(chain.sampler, grammar)
    temperature = 0.8 if body.temperature is None else body.temperature
    if temperature <= 0:
        chain.add_greedy()  # type: ignore[no-untyped-call]
        return chain
    chain.add_top_k(40)
    chain.add_top_p(0.95 if body.top_p is None else body.top_p, 1)
    chain.add_min_p(0.05, 1)
    chain.add_temp(temperature)
    chain.add_dist(llama_cpp.LLAMA_DEFAULT_SEED if body.seed is None else body.seed % 2**32)
    return chain


def _usage(end: Finish) -> dict[str, Any]:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.prompt_tokens + end.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": end.cached_tokens}}


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _finish(reason: str, parser: tools.CallParser) -> str:
    """"tool_calls" when every call is complete, even if the token limit then cut off more."""
    return "tool_calls" if parser.complete_calls else reason


async def _text(events: Events) -> tuple[str, Finish]:
    pieces: list[str] = []
    async for event in events:
        if isinstance(event, Finish):
            return "".join(pieces), event
        pieces.append(event)
    raise RuntimeError("generation ended without finishing")


def _head(kind: str) -> dict[str, Any]:
    prefix = "chatcmpl-" if kind.startswith("chat") else "cmpl-"
    return {"id": prefix + uuid.uuid4().hex, "object": kind, "created": int(time.time()),
            "model": ""}


async def complete(events: Events, body: CompletionRequest) -> dict[str, Any]:
    """/v1/completions, not streamed."""
    text, end = await _text(events)
    return {**_head("text_completion"), "choices": [{
        "text": text, "index": 0, "logprobs": None, "finish_reason": end.reason}],
        "usage": _usage(end)}


async def complete_stream(events: Events, body: CompletionRequest) -> Chunks:
    head = _head("text_completion")
    async for event in events:
        text, reason = (event, None) if isinstance(event, str) else ("", event.reason)
        yield {**head, "choices": [{"text": text, "index": 0, "logprobs": None,
                                    "finish_reason": reason}]}
        if isinstance(event, Finish) and body.stream_options is not None \
                and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": _usage(event)}


async def chat_once(events: Events, prep: Prepared, body: ChatRequest) -> dict[str, Any]:
    text, end = await _text(events)
    content, calls = "", list[dict[str, Any]]()
    parser = tools.CallParser(prep.mode)
    for event in parser.feed(text):
        if event.kind == "content":
            content += event.text
        elif event.kind == "call":
            calls.append({"id": _call_id(), "type": "function",
                          "function": {"name": event.text, "arguments": ""}})
        else:
            calls[event.index]["function"]["arguments"] += event.text
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return {**_head("chat.completion"), "choices": [{
        "index": 0, "message": message, "logprobs": None,
        "finish_reason": _finish(end.reason, parser)}], "usage": _usage(end)}


async def chat_stream(events: Events, prep: Prepared, body: ChatRequest) -> Chunks:
    head = _head("chat.completion.chunk")

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    parser = tools.CallParser(prep.mode)
    async for event in events:
        if isinstance(event, Finish):
            yield chunk({}, _finish(event.reason, parser))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield {**head, "choices": [], "usage": _usage(event)}
            return
        for part in parser.feed(event):
            if part.kind == "content":
                yield chunk({"content": part.text})
            elif part.kind == "call":
                yield chunk({"tool_calls": [{"index": part.index, "id": _call_id(),
                                             "type": "function", "function": {
                                                 "name": part.text, "arguments": ""}}]})
            else:
                yield chunk({"tool_calls": [{"index": part.index,
                                             "function": {"arguments": part.text}}]})

"""Chat completions from a loaded llama.cpp model: prompt, grammar, OpenAI-shaped answers.

Runs on the runner's worker thread (every function here calls into llama.cpp).  The model's
raw text goes through `tools.CallParser`; the non-streaming answer and the streamed chunks are
both assembled from its events, so a stream reassembles into exactly the whole answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec

from nodeagent import chat, tools
from nodeagent.wire import ChatRequest, message_dicts

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class Prepared(msgspec.Struct, frozen=True):
    prompt: str
    stop: list[str]
    mode: tools.Mode
    grammar: str | None


def prepare(llm: Any, body: ChatRequest) -> Prepared:
    """Render the prompt for this model and decide how the output is constrained."""
    mode, grammar = tools.plan(body)
    template = llm.metadata.get("tokenizer.chat_template")
    arch = llm.metadata.get("general.architecture", "")
    user_stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if template is None and arch.startswith("gemma"):
        prompt = chat.render_gemma(body.messages, body.tools)
        return Prepared(prompt, [chat.GEMMA_STOP, *user_stop], mode, grammar)
    token_text = llm._model.token_get_text
    messages = message_dicts(body.messages)
    prompt, stop = chat.render_template(template or CHATML, token_text(llm.token_bos()),
                                        token_text(llm.token_eos()), messages, body.tools)
    return Prepared(prompt, [*stop, *user_stop], mode, grammar)


def _completion_args(llm: Any, prep: Prepared, body: ChatRequest) -> dict[str, Any]:
    args: dict[str, Any] = {"prompt": prep.prompt, "stop": prep.stop, "seed": body.seed,
                            "max_tokens": body.max_completion_tokens or body.max_tokens}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if getattr(body, name) is not None:
            args[name] = getattr(body, name)
    if prep.grammar is not None:
        from llama_cpp.llama_grammar import LlamaGrammar

        args["grammar"] = LlamaGrammar.from_string(prep.grammar, verbose=False)
    return args


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _finish(reason: str | None, parser: tools.CallParser) -> str:
    """"tool_calls" when every call is complete, even if the token limit then cut off more."""
    if parser.complete_calls:
        return "tool_calls"
    return reason or "stop"


def chat_once(llm: Any, prep: Prepared, body: ChatRequest, model_id: str) -> dict[str, Any]:
    result = llm.create_completion(**_completion_args(llm, prep, body))
    choice = result["choices"][0]
    content, calls = "", list[dict[str, Any]]()
    parser = tools.CallParser(prep.mode)
    for event in parser.feed(choice["text"]):
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
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion",
            "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish(choice["finish_reason"], parser)}],
            "usage": result["usage"]}


def chat_stream(llm: Any, prep: Prepared, body: ChatRequest,
                model_id: str) -> Iterator[dict[str, Any]]:
    base = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model_id}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    parser, reason, generated = tools.CallParser(prep.mode), None, 0
    for piece in llm.create_completion(stream=True, **_completion_args(llm, prep, body)):
        choice = piece["choices"][0]
        generated += 1
        reason = choice["finish_reason"] or reason
        for event in parser.feed(choice["text"]):
            if event.kind == "content":
                yield chunk({"content": event.text})
            elif event.kind == "call":
                yield chunk({"tool_calls": [{"index": event.index, "id": _call_id(),
                                             "type": "function", "function": {
                                                 "name": event.text, "arguments": ""}}]})
            else:
                yield chunk({"tool_calls": [{"index": event.index,
                                             "function": {"arguments": event.text}}]})
    yield chunk({}, _finish(reason, parser))
    if body.stream_options is not None and body.stream_options.include_usage:
        prompt_tokens = len(llm.tokenize(prep.prompt.encode(), special=True))
        yield {**base, "choices": [], "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated}}

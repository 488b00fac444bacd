"""Chat completions from a loaded llama.cpp model: prompt, grammar, OpenAI-shaped answers.

Runs on the runner's worker thread (every function here calls into llama.cpp).  The model's
raw text goes through `tools.CallParser`; the non-streaming answer and the streamed chunks are
both assembled from its events, so a stream reassembles into exactly the whole answer.
`prepare` does everything that can refuse a request (context, token budget, grammar) before
any token is generated; generation checks a stop flag at every token.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec

from myco.errors import BadRequest
from nodeagent.runner import chat, tools, wire
from nodeagent.runner.wire import ChatRequest, CompletionRequest, message_dicts

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class Prepared(msgspec.Struct, frozen=True):
    prompt: list[int]  # tokens, as create_completion would have made them from the text
    stop: list[str]
    max_tokens: int
    mode: tools.Mode = "text"
    grammar: str | None = None


def prepare(llm: Any, body: ChatRequest | CompletionRequest) -> Prepared:
    """Render and tokenize the prompt, decide the token budget and the output's grammar.

    BadRequest naming the parameter when the prompt leaves no room in the context, or when no
    grammar can be built from the tools or the schema (which would crash the process later).
    """
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    mode: tools.Mode = "text"
    grammar, param = None, "prompt"
    if isinstance(body, CompletionRequest):
        text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    else:
        (text, own_stop), param = _render(llm, body), "messages"
        stop = [*own_stop, *stop]
        mode, grammar = _grammar(llm, body)
    prompt = llm.tokenize(text.encode(), add_bos=True, special=True) or [llm.token_bos()]
    asked, n_ctx = wire.asked_tokens(body, llm.n_ctx()), llm.n_ctx()
    if len(prompt) >= n_ctx:
        wanted = "the rest of the context" if asked is None else f"{asked} more"
        raise BadRequest(f"the prompt is {len(prompt)} tokens and the context {n_ctx}: no room "
                         f"for the answer ({wanted} asked); shorten the prompt", param=param)
    room = n_ctx - len(prompt)
    return Prepared(prompt, stop, room if asked is None else min(asked, room), mode, grammar)


def _render(llm: Any, body: ChatRequest) -> tuple[str, list[str]]:
    template = llm.metadata.get("tokenizer.chat_template")
    if template is None and llm.metadata.get("general.architecture", "").startswith("gemma"):
        return chat.render_gemma(body.messages, body.tools), [chat.GEMMA_STOP]
    token_text = llm._model.token_get_text
    return chat.render_template(template or CHATML, token_text(llm.token_bos()),
                                token_text(llm.token_eos()), message_dicts(body.messages),
                                body.tools)


# A grammar element that matches only NUL makes llama.cpp throw at the first token (abort);
# a NUL character itself would cut the C string short.
_NUL = re.compile(r"(?<!-)\\(?:x00|u0000|U00000000)(?!-)|-\\(?:x00|u0000|U00000000)")


def _grammar(llm: Any, body: ChatRequest) -> tuple[tools.Mode, str | None]:
    """tools.plan, every failure a BadRequest: llama-cpp-python would crash on it later."""
    import llama_cpp

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
        llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
    if not sampler:
        raise BadRequest(f"the grammar made from {param} is refused by llama.cpp (strings with "
                         '" or NUL are not supported)', param=param)
    llama_cpp.llama_sampler_free(sampler)
    return mode, grammar


def _completion_args(prep: Prepared, body: ChatRequest | CompletionRequest,
                     stop: threading.Event) -> dict[str, Any]:
    from llama_cpp import StoppingCriteriaList
    from llama_cpp.llama_grammar import LlamaGrammar

    # Checked at every token: the runner sets `stop` when the client goes away.
    args: dict[str, Any] = {"prompt": prep.prompt, "stop": prep.stop, "seed": body.seed,
                            "max_tokens": prep.max_tokens, "stopping_criteria":
                            StoppingCriteriaList([lambda _ids, _logits: stop.is_set()])}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if getattr(body, name) is not None:
            args[name] = getattr(body, name)
    if prep.grammar is not None:
        args["grammar"] = LlamaGrammar.from_string(prep.grammar, verbose=False)
    return args


def complete(llm: Any, prep: Prepared, body: CompletionRequest, stop: threading.Event) -> Any:
    """/v1/completions: the answer, or its chunks when body.stream."""
    return llm.create_completion(stream=body.stream, **_completion_args(prep, body, stop))


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _finish(reason: str | None, parser: tools.CallParser) -> str:
    """"tool_calls" when every call is complete, even if the token limit then cut off more."""
    if parser.complete_calls:
        return "tool_calls"
    return reason or "stop"


def chat_once(llm: Any, prep: Prepared, body: ChatRequest,
              stop: threading.Event) -> dict[str, Any]:
    result = llm.create_completion(**_completion_args(prep, body, stop))
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
            "created": int(time.time()), "model": "",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish(choice["finish_reason"], parser)}],
            "usage": result["usage"]}


def chat_stream(llm: Any, prep: Prepared, body: ChatRequest,
                stop: threading.Event) -> Iterator[dict[str, Any]]:
    base = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk",
            "created": int(time.time()), "model": ""}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    parser, reason, generated = tools.CallParser(prep.mode), None, 0
    for piece in llm.create_completion(stream=True, **_completion_args(prep, body, stop)):
        choice = piece["choices"][0]
        # One piece per token, then a closing piece that carries the finish reason: not a token
        # unless it still holds text.
        generated += choice["finish_reason"] is None or bool(choice["text"])
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
        prompt_tokens = len(prep.prompt)
        yield {**base, "choices": [], "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated}}

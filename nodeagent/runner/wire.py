"""Typed request bodies the node accepts (OpenAI's shapes): the node agent decodes each one
(nodeagent/app.py) before any model work, the runner again to generate from it.

Unknown fields are ignored, as OpenAI's API does for clients that send newer parameters; what
the node cannot honour (n > 1, image parts for a text-only model) is a 400 naming the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from myco import protocol
from myco.errors import BadRequest
from nodeagent.runner import schema


class Message(msgspec.Struct, frozen=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


Tokens = Annotated[int, msgspec.Meta(ge=1)]  # and at most the context: `asked_tokens`


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class _Sampling(msgspec.Struct, frozen=True):
    model: str
    max_tokens: Tokens | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream_options: StreamOptions | None = None


class Function(msgspec.Struct, frozen=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None


class Tool(msgspec.Struct, frozen=True):
    function: Function
    type: Literal["function"] = "function"


class NamedChoice(msgspec.Struct, frozen=True):
    function: dict[str, str]
    type: Literal["function"] = "function"


class JsonSchemaFormat(msgspec.Struct, frozen=True):
    name: str = "response"
    schema: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, frozen=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Sampling, frozen=True):
    messages: list[Message] = []
    max_completion_tokens: Tokens | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    # Parameters we cannot honour: refused by name rather than silently ignored.
    logprobs: bool | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    functions: list[Any] | None = None

    @property
    def chosen_function(self) -> str | None:
        return self.tool_choice.function.get("name") \
            if isinstance(self.tool_choice, NamedChoice) else None


class CompletionRequest(_Sampling, frozen=True):
    prompt: str | list[str] = ""


class EmbeddingRequest(msgspec.Struct, frozen=True):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"


Body = TypeVar("Body", bound=ChatRequest | CompletionRequest | EmbeddingRequest
               | protocol.LeaseRequest)


def decode(raw: bytes, kind: type[Body], n_ctx: int | None = None) -> Body:
    """Decode and check a request body; every problem is a `BadRequest` naming the field.  With
    `n_ctx`, a token limit above the context is refused too (`asked_tokens`)."""
    try:
        body = msgspec.json.decode(raw, type=kind)
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Expected `object`, got") and "- at" not in text:
            raise BadRequest("request body must be a JSON object") from None
        found = re.search(r"at `\$\.?([^`]*)`", text) or re.search(r"field `([^`]+)`", text)
        raise BadRequest(f"invalid request: {text}", param=found.group(1) if found else None) \
            from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if isinstance(body, ChatRequest):
        _check_chat(body)
    if isinstance(body, CompletionRequest) and isinstance(body.prompt, list) \
            and len(body.prompt) != 1:
        raise BadRequest("only one prompt per request is supported", param="prompt")
    if isinstance(body, ChatRequest | CompletionRequest) and body.n != 1:
        raise BadRequest("n > 1 is not supported: ask once per choice", param="n")
    if isinstance(body, ChatRequest | CompletionRequest) and n_ctx is not None:
        asked_tokens(body, n_ctx)
    if isinstance(body, EmbeddingRequest) and isinstance(body.input, list) and not body.input:
        raise BadRequest("input must not be empty", param="input")
    return body


def asked_tokens(body: ChatRequest | CompletionRequest, n_ctx: int) -> int | None:
    """The token limit asked: max_completion_tokens, else max_tokens (for /v1/completions 16
    when absent, as OpenAI's); None: the rest of the context.  More than `n_ctx`: BadRequest."""
    param, asked = "max_tokens", body.max_tokens
    if isinstance(body, CompletionRequest):
        asked = 16 if asked is None else asked
    elif body.max_completion_tokens is not None:
        param, asked = "max_completion_tokens", body.max_completion_tokens
    if asked is not None and asked > n_ctx:
        raise BadRequest(f"{param} must be from 1 to the context size, {n_ctx}", param=param)
    return asked


def _check_chat(body: ChatRequest) -> None:
    if not body.messages:
        raise BadRequest("messages must contain at least one message", param="messages")
    for param, value in (("logprobs", body.logprobs), ("audio", body.audio),
                         ("prediction", body.prediction)):
        if value:
            raise BadRequest(f"{param} is not supported by this node", param=param)
    if body.functions is not None:
        raise BadRequest("the legacy `functions` parameter is not supported: use `tools`",
                         param="functions")
    names = [t.function.name for t in body.tools or ()]
    if body.tool_choice is not None and body.tool_choice != "none" and not names:
        raise BadRequest("tool_choice needs tools", param="tool_choice")
    if body.chosen_function is not None and body.chosen_function not in names:
        raise BadRequest(f"tool_choice names {body.chosen_function!r}, which is not in tools",
                         param="tool_choice")
    if (fmt := body.response_format) is not None and fmt.type == "json_schema" \
            and fmt.json_schema is None:
        raise BadRequest("response_format json_schema needs `json_schema`",
                         param="response_format")
    for i, message in enumerate(body.messages):
        for part in message.content if isinstance(message.content, list) else ():
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{i}].content: only text parts are supported by "
                                 f"this model, got {part.get('type')!r}",
                                 param=f"messages[{i}].content")
    schema.check_chat(body)


def message_dicts(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as llama-cpp-python takes them: text parts joined into one string."""
    out = []
    for message in messages:
        item = {k: v for k, v in msgspec.structs.asdict(message).items() if v is not None}
        item.setdefault("content", "")  # a template that adds content to text (SmolLM2's)
        if isinstance(message.content, list):
            item["content"] = "".join(part["text"] for part in message.content)
        item["role"] = "system" if message.role == "developer" else message.role
        out.append(item)
    return out

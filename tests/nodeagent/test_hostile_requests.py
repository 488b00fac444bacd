"""One request against everyone: hostile bodies sent straight to a real node (and its runner).

Each of these used to crash the runner process (so every queued request got a 502), answer 500,
or keep the model's only sequence busy for minutes.  Now each is a 400 naming the parameter, the
runner survives it, and a client that goes away stops its generation at the next token."""

from __future__ import annotations

import json
import socket
import ssl
import time
from typing import Any

import httpx
import jsonschema
import pytest

from tests.conftest import MODEL_ID, queue_depth
from tests.procs import Proc, wait_for

ASK: Any = [{"role": "user", "content": "Count to ten."}]
CHAT: Any = {"model": MODEL_ID, "messages": ASK}
N_CTX = 1024  # the session node's --n-ctx


def schema_format(schema: Any) -> Any:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def tool(name: str, parameters: Any = None) -> Any:
    return {"type": "function", "function": {"name": name,
                                             "parameters": parameters or {"type": "object"}}}


def post(node: Proc, tls: ssl.SSLContext, body: Any, path: str = "/v1/chat/completions",
         ) -> httpx.Response:
    return httpx.post(node.url + path, json=body, timeout=120, verify=tls)


def runner_pid(node: Proc, tls: ssl.SSLContext) -> int:
    assert post(node, tls, {**CHAT, "max_tokens": 1}).status_code == 200
    pid: int = httpx.get(node.url + "/node/info", verify=tls).json()["runners"][0]["pid"]
    return pid


SCHEMA = "response_format.json_schema.schema"
HOSTILE = [
    # Grammars llama.cpp cannot parse: a null sampler, and a segfault at the first token.
    ({"response_format": schema_format({"enum": []})}, SCHEMA, "enum"),
    ({"tools": [tool("a"), tool("b"), tool("c"), tool('d"')], "tool_choice": "required"},
     "tools[3].function.name", "^[a-zA-Z0-9_-]{1,64}$"),
    ({"response_format": schema_format({"enum": ['say "hi"']})}, SCHEMA, "llama.cpp"),
    # Parses, then matches only NUL: llama.cpp throws at the first token (abort).
    ({"response_format": schema_format({"const": "\u0000"})}, SCHEMA, "NUL"),
    # 100,000 nested repetitions overflow the C++ grammar parser's stack.
    ({"response_format": schema_format({"type": "string", "maxLength": 100000})}, SCHEMA,
     "1000"),
    ({"response_format": schema_format({"type": "string", "pattern": "^a{0,99999}$"})}, SCHEMA,
     "1000"),
    # Were 500s.
    ({"response_format": schema_format({"$ref": "#"})}, SCHEMA, "recursive"),
    ({"response_format": schema_format({"$defs": {"a": {"$ref": "#/$defs/a"}},
                                        "$ref": "#/$defs/a"})}, SCHEMA, "recursive"),
    ({"tools": [tool("t", {"type": "object", "properties": {"kids": {
        "type": "array", "items": {"$ref": "#/$defs/node"}}}, "$defs": {"node": {
            "type": "object", "properties": {"kids": {"type": "array", "items": {
                "$ref": "#/$defs/node"}}}}}})]},
     "tools[0].function.parameters", "recursive"),
    ({"tools": [tool(f"f{i}") for i in range(1000)]}, "tools", "128"),
    ({"response_format": schema_format({"type": "wat"})}, SCHEMA, "unknown type"),
    # Refused rather than ignored: the grammar could not enforce it.
    ({"response_format": schema_format({"type": "integer", "minimum": 3})}, SCHEMA, "minimum"),
    # Never fetched (llama-cpp-python would, but for an `assert` that -O removes).
    ({"response_format": schema_format({"$ref": "https://example.com/s.json"})}, SCHEMA,
     "same schema"),
]


def test_no_schema_or_tool_list_takes_the_runner_down(node: Proc,
                                                      node_tls: ssl.SSLContext) -> None:
    pid = runner_pid(node, node_tls)
    for extra, param, said in HOSTILE:
        response = post(node, node_tls, {**CHAT, "max_tokens": 4, **extra})
        assert response.status_code == 400, (extra, response.text)
        error = response.json()["error"]
        assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
        assert said in error["message"], error
    assert runner_pid(node, node_tls) == pid  # the same process answered throughout


def test_a_schema_within_the_limits_still_constrains_the_answer(
        node: Proc, node_tls: ssl.SSLContext) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "tags": {
        "type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 2}},
        "required": ["n", "tags"], "additionalProperties": False,
        "$defs": {"tag": {"type": "string", "maxLength": 8}}}
    response = post(node, node_tls, {**CHAT, "max_tokens": 120, "temperature": 0,
                                     "response_format": schema_format(schema)})
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]
    assert answer["finish_reason"] == "stop", answer  # the schema bounds all but `n`'s digits
    jsonschema.validate(json.loads(answer["message"]["content"]), schema)


def test_json_nested_1000_deep_is_a_400(node: Proc, node_tls: ssl.SSLContext) -> None:
    deep = '{"a":' * 1000 + "1" + "}" * 1000
    raw = json.dumps({**CHAT, "response_format": schema_format({})})
    raw = raw.replace('"schema": {}', f'"schema": {deep}')
    response = httpx.post(node.url + "/v1/chat/completions", content=raw, timeout=30,
                          verify=node_tls, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "nested too deeply" in response.json()["error"]["message"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 1500}]},
     "messages"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "word " * 1500, "max_tokens": 5},
     "prompt"),
])
def test_a_prompt_longer_than_the_context_is_a_400_with_the_numbers(
        node: Proc, node_tls: ssl.SSLContext, path: str, body: Any, param: str) -> None:
    response = post(node, node_tls, body, path)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    tokens = int(error["message"].split("the prompt is ")[1].split()[0])
    assert tokens > N_CTX
    assert f"the context {N_CTX}" in error["message"]
    assert ("5 more" if path == "/v1/completions" else "the rest of the context") \
        in error["message"]


@pytest.mark.parametrize(("path", "field", "value"), [
    (path, field, value)
    for path, fields in (("/v1/chat/completions", ("max_tokens", "max_completion_tokens")),
                         ("/v1/completions", ("max_tokens",)))
    for field in fields
    for value in (0, -1, 2**63, 2**64, N_CTX + 1)])
def test_token_limits_outside_one_to_the_context_are_400s(
        node: Proc, node_tls: ssl.SSLContext, path: str, field: str, value: int) -> None:
    body = {**CHAT, field: value} if path == "/v1/chat/completions" else \
        {"model": MODEL_ID, "prompt": "Hello", field: value}
    response = post(node, node_tls, body, path)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_absent_token_limits(node: Proc, node_tls: ssl.SSLContext) -> None:
    # Chat: null is the rest of the context, so 40 forced numbers (80+ tokens) come whole.
    forty = schema_format({"type": "array", "items": {"type": "integer"},
                           "minItems": 40, "maxItems": 40})
    chat = post(node, node_tls, {**CHAT, "max_tokens": None, "response_format": forty})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["finish_reason"] == "stop"
    assert len(json.loads(chat.json()["choices"][0]["message"]["content"])) == 40
    # /v1/completions keeps OpenAI's default of 16.
    done = post(node, node_tls, {"model": MODEL_ID, "prompt": "1, 2, 3, 4,"}, "/v1/completions")
    assert done.status_code == 200, done.text
    assert done.json()["usage"]["completion_tokens"] <= 16


def send_and_leave_later(node: Proc, tls: ssl.SSLContext, body: Any) -> ssl.SSLSocket:
    """A request sent whole on its own connection; the caller closes it without reading."""
    host, port = node.address.rsplit(":", 1)
    sock = tls.wrap_socket(socket.create_connection((host, int(port))))
    raw = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: node\r\n"
                 b"content-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(raw), raw))
    return sock


def test_a_client_that_leaves_stops_its_generation(node: Proc,
                                                   node_tls: ssl.SSLContext) -> None:
    # 300 numbers forced by the grammar: each request runs to max_tokens unless stopped.
    long_format = schema_format({"type": "array", "items": {"type": "integer"},
                                 "minItems": 300, "maxItems": 300})
    long: Any = {**CHAT, "max_tokens": 400, "response_format": long_format}
    started = time.monotonic()
    sample = post(node, node_tls, {**long, "max_tokens": 32})
    assert sample.json()["usage"]["completion_tokens"] == 32
    per_token = (time.monotonic() - started) / 32  # an overestimate: prompt and HTTP included

    sent = time.monotonic()
    left = [send_and_leave_later(node, node_tls, long) for _ in range(3)]
    left.append(send_and_leave_later(node, node_tls, {**long, "stream": True}))
    # All four queued: the first is generating, the others wait their turn.
    wait_for(lambda: queue_depth(node, node_tls) == len(left), 30, "the four queued")
    lead = time.monotonic() - sent
    for sock in left:
        sock.close()
    started = time.monotonic()
    quick = post(node, node_tls, {**CHAT, "max_tokens": 1})
    waited = time.monotonic() - started
    assert quick.status_code == 200, quick.text
    # Had the four run on, the quick one would have waited for ~1600 tokens, less what was
    # generated before they left.
    would_wait = len(left) * 400 * per_token - lead
    print(f"served after {waited:.2f} s; abandoned work would have taken {would_wait:.1f} s")
    assert waited < would_wait / 4

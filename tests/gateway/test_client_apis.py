"""The Responses and Messages APIs served by a chat-only upstream (a real OpenAI-compatible
server, bench/fake_upstream.py, that knows neither), through the same policy, keys, route
headers and audit log as chat completions.  Shapes are checked against the official SDKs'
types (tests/sdk_shapes.py).  No model: the fast tier.

Also: the policy tells the client APIs apart, stored responses belong to the client that made
them, and a stream cut mid-way ends in the API's own failure event, each event relayed as it
came (never buffered)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.types import ErrorResponse, Message, RawMessageStreamEvent
from openai import omit
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent

from tests.conftest import PolicyFactory
from tests.procs import Proc, fake_upstream
from tests.rawserver import RawServer
from tests.sdk_shapes import audit_entry, sse, strict

KEYS = {"MYCO_TEST_ALICE": "key-alice", "MYCO_TEST_BOB": "key-bob"}
COUNTED = " ".join(str(i) for i in range(16)) + " "  # what fake_upstream streams
PAUSE = 0.5


class CutStream(RawServer):
    """A chat stream that sends two chunks `PAUSE` apart, then drops the connection."""

    def __init__(self) -> None:
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        for text in ("first", "second"):
            data = b'data: {"choices": [{"index": 0, "delta": {"content": "%s"}}]}\n\n' % \
                text.encode()
            conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            time.sleep(PAUSE)


@pytest.fixture(scope="module")
def gw(start_gateway: PolicyFactory) -> Iterator[Proc]:
    upstream, cut = fake_upstream("up"), CutStream()
    yield start_gateway(f"""
[upstreams.up]
url = "{upstream.url}/v1"
cloud = false

[upstreams.cut]
url = "http://127.0.0.1:{cut.port}/v1"
cloud = false
models = ["cut-model"]

[clients.alice]
key_env = "MYCO_TEST_ALICE"

[clients.bob]
key_env = "MYCO_TEST_BOB"

[[routes]]
match = {{ model = "chat-only", endpoint = ["responses", "messages"] }}
deny = "this model is for chat clients"

[[routes]]
match = {{ model = "cut-model" }}
forward = ["cut"]

[[routes]]
match = {{ model = "*" }}
forward = ["up"]
""", env=KEYS)
    upstream.stop()
    cut.close()


@pytest.fixture(scope="module")
def oai(gw: Proc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="key-alice", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def claude(gw: Proc) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.url, api_key="key-alice", max_retries=0) as client:
        yield client


def routed(gw: Proc, headers: Any, endpoint: str, stream: bool = False) -> None:
    assert (headers["x-myco-node"], headers["x-myco-rule"]) == ("up", "routes[2]")
    assert headers["content-type"].startswith(
        "text/event-stream" if stream else "application/json")
    entry = audit_entry(gw, headers["x-request-id"])
    assert (entry["endpoint"], entry["client"], entry["target"], entry["status"]) == \
        (endpoint, "alice", "up", 200)


def test_responses(oai: openai.OpenAI, gw: Proc) -> None:
    raw = oai.responses.with_raw_response.create(model="fake-model", input="hi")
    routed(gw, raw.headers, "responses")
    whole = strict(Response, raw.http_response.json())
    assert whole.status == "completed" and whole.output_text == "hello from up"
    assert whole.usage.input_tokens == 1 and whole.usage.output_tokens == 3

    with oai.responses.with_streaming_response.create(
            model="fake-model", input="hi", stream=True) as streamed:
        routed(gw, streamed.headers, "responses", stream=True)
        events = sse(streamed.iter_lines())
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    for _, data in events:
        state.handle_event(strict(ResponseStreamEvent, data))
    assert events[-1][0] == "response.completed"
    assert state._completed_response is not None
    assert state._completed_response.output_text == COUNTED


def test_stored_responses_belong_to_their_client(oai: openai.OpenAI, gw: Proc) -> None:
    made = oai.responses.create(model="fake-model", input="hi")
    assert oai.responses.retrieve(made.id).output_text == "hello from up"
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="key-bob", max_retries=0) as bob:
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.create(model="fake-model", input="hi", previous_response_id=made.id)
    oai.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(made.id)
    unstored = oai.responses.create(model="fake-model", input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(unstored.id)


def test_messages(claude: anthropic.Anthropic, gw: Proc) -> None:
    ask: dict[str, Any] = {"model": "fake-model", "max_tokens": 16,
                           "messages": [{"role": "user", "content": "hi"}]}
    raw = claude.messages.with_raw_response.create(**ask)
    routed(gw, raw.headers, "messages")
    whole = strict(Message, raw.json())
    assert whole.content[0].text == "hello from up"  # type: ignore[union-attr]
    assert whole.stop_reason == "end_turn"

    with claude.messages.with_streaming_response.create(stream=True, **ask) as streamed:
        routed(gw, streamed.headers, "messages", stream=True)
        events = sse(streamed.iter_lines())
    for _, data in events:
        strict(RawMessageStreamEvent, data)
    with claude.messages.stream(**ask) as stream:
        assert "".join(stream.text_stream) == COUNTED
        assert stream.get_final_message().stop_reason == "end_turn"

    with pytest.raises(anthropic.InternalServerError) as uncounted:
        claude.messages.count_tokens(model="fake-model", messages=ask["messages"])
    body = strict(ErrorResponse, uncounted.value.body)
    assert "up: an upstream cannot count tokens" in body.error.message


def test_keys_and_the_policy_tell_clients_and_apis_apart(gw: Proc) -> None:
    with anthropic.Anthropic(base_url=gw.url, api_key="wrong", max_retries=0) as stranger, \
            pytest.raises(anthropic.AuthenticationError) as refused:
        stranger.messages.create(model="fake-model", max_tokens=4,
                                 messages=[{"role": "user", "content": "hi"}])
    assert strict(ErrorResponse, refused.value.body).error.type == "authentication_error"

    bearer = {"authorization": "Bearer key-alice"}
    denied = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": "key-alice"}, json={
        "model": "chat-only", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert denied.status_code == 403 and denied.headers["x-myco-rule"] == "routes[0]"
    assert denied.json()["error"]["type"] == "permission_error"
    denied = httpx.post(gw.url + "/v1/responses", headers=bearer,
                        json={"model": "chat-only", "input": "hi"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "denied_by_policy"
    served = httpx.post(gw.url + "/v1/chat/completions", headers=bearer, json={
        "model": "chat-only", "messages": [{"role": "user", "content": "hi"}]})
    assert served.status_code == 200 and served.headers["x-myco-rule"] == "routes[2]"
    for endpoint, rule in (("messages", "routes[0]"), ("responses", "routes[0]"),
                           ("chat", "routes[2]")):
        decided = httpx.post(gw.url + "/v1/policy/dry-run", headers=bearer, json={
            "model": "chat-only", "endpoint": endpoint}).json()
        assert decided["rule_name"] == rule


def test_a_stream_cut_mid_way_fails_in_the_apis_own_event(gw: Proc) -> None:
    bearer = {"authorization": "Bearer key-alice"}
    for path, body, last in (
            ("/v1/responses", {"input": "hi"}, "response.failed"),
            ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
             "error")):
        started, lines = time.monotonic(), []
        with httpx.stream("POST", gw.url + path, headers=bearer, timeout=10, json={
                "model": "cut-model", "stream": True, **body}) as response:
            for line in response.iter_lines():
                lines.append(line)
                if '"first"' in line:  # relayed before the upstream sends its second chunk
                    assert time.monotonic() - started < PAUSE, "the translation buffered"
        events = sse(lines)
        name, data = events[-1]
        assert name == last, events
        if path == "/v1/responses":
            failed = strict(ResponseStreamEvent, data)
            assert failed.response.status == "failed"
            assert "mid-stream" in failed.response.error.message
            assert failed.response.output[0].content[0].text == "firstsecond"
        else:
            assert "mid-stream" in strict(ErrorResponse, data).error.message
            assert json.dumps(events).count("text_delta") == 2

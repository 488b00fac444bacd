"""The official openai client, pointed at a gateway on loopback, against the real Gemma 3 270M."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL_ID, check_answer
from tests.procs import Proc

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def client(gateway: Proc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="local", max_retries=0,
                       timeout=120) as client:
        yield client


def test_chat(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert raw.headers["x-myco-node"] == "local"
    assert raw.headers["x-myco-rule"] == "routes[0]"
    reply = raw.parse()
    assert reply.model == MODEL_ID
    assert reply.choices[0].message.role == "assistant"
    check_answer(reply, 8)


def test_chat_stream_gives_the_same_greedy_answer(client: openai.OpenAI) -> None:
    kwargs: Any = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    with client.chat.completions.with_streaming_response.create(stream=True,
                                                                **kwargs) as response:
        assert response.headers["x-myco-node"] == "local"
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == check_answer(whole, 8)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.model == MODEL_ID for c in chunks)


def test_streamed_usage_is_the_answers(client: openai.OpenAI) -> None:
    kwargs: Any = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    *_, last = client.chat.completions.create(stream=True,
                                              stream_options={"include_usage": True}, **kwargs)
    assert last.usage == whole.usage


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL_ID, prompt="The sky is", max_tokens=6,
                                      temperature=0)
    streamed = client.completions.create(model=MODEL_ID, prompt="The sky is", max_tokens=6,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == check_answer(reply, 6)


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=MODEL_ID, input=["hello", "a longer sentence"])
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 640  # Gemma 3 270M's embedding width
    assert result.data[0].embedding != result.data[1].embedding


def test_models(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert MODEL_ID in models
    assert models[MODEL_ID].owned_by == "local"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)  # type: ignore
    assert caught.value.status_code == 404


def test_node_validates_fields_the_gateway_does_not_parse(gateway: Proc) -> None:
    cases = [({"model": MODEL_ID, "messages": "hi"}, "messages"),
             ({"model": MODEL_ID, "messages": []}, "messages"),
             ({"model": MODEL_ID, "messages": MESSAGES, "n": 2}, "n"),
             ({"model": MODEL_ID, "messages": MESSAGES, "max_tokens": "8"}, "max_tokens"),
             ({"model": MODEL_ID, "messages": [{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
              "messages[0].content")]
    for body, param in cases:
        response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        assert response.headers["x-myco-node"] == "local"


def test_client_going_away_mid_stream_leaves_node_serving(client: openai.OpenAI,
                                                          gateway: Proc) -> None:
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL_ID, "messages": MESSAGES, "max_tokens": 200, "stream": True}) as r:
        for _ in r.iter_raw():
            break  # read one chunk, then hang up
    reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES,  # type: ignore
                                           max_tokens=4)
    check_answer(reply, 4)

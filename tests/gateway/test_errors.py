"""Every error status the gateway gives, from a request that provokes it: OpenAI's envelope,
the right status, never a 500 or a hang, and the gateway keeps serving afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from myco.identity import Identity
from tests.conftest import PolicyFactory
from tests.procs import Proc, fake_upstream
from tests.rawserver import RawServer


@pytest.fixture(scope="module")
def hangup_port() -> Iterator[int]:
    """A server that reads a request and closes the connection without answering."""
    server = RawServer(lambda conn: conn.recv(65536))
    yield server.port
    server.close()


@pytest.fixture(scope="module")
def gw(start_gateway: PolicyFactory, hangup_port: int,
       gateway_identity: Identity) -> Iterator[Proc]:
    fake = fake_upstream("good", "m1", node_for=gateway_identity)
    proc = start_gateway(f"""
[nodes.good]
address = "{fake.address}"
id = "{fake.node_id}"
[nodes.dead]
address = "127.0.0.1:9"
[upstreams.hangup]
url = "http://127.0.0.1:{hangup_port}/v1"
cloud = false
[upstreams.closed]
url = "http://127.0.0.1:9/v1"
cloud = false

[[routes]]
match = {{ model = "forbidden-*" }}
deny = "not on this network"
[[routes]]
match = {{ model = "hangup" }}
forward = ["hangup"]
[[routes]]
match = {{ model = "closed" }}
forward = ["closed"]
[[routes]]
match = {{ model = "dead-*" }}
forward = ["dead"]
[[routes]]
match = {{ model = "*" }}
forward = ["good"]
""", env={"MYCO_GATEWAY_MAX_BODY_BYTES": "4096"})
    yield proc
    fake.stop()


CASES = [
    # (body bytes, status, error type, param, message fragment)
    (b'{"model": "m1", ', 400, "invalid_request_error", None, "not valid JSON"),
    (b'[1, 2]', 400, "invalid_request_error", None, "must be a JSON object"),
    (b'{"messages": []}', 400, "invalid_request_error", "model", "missing required field"),
    (b'{"model": 7}', 400, "invalid_request_error", "model", "Expected `str`, got `int`"),
    (b'{"model": "m1", "stream": "yes"}', 400, "invalid_request_error", "stream", "Expected"),
    (b'{"model": "nope"}', 404, "invalid_request_error", None, "'nope' is not served"),
    (b'{"model": "forbidden-x"}', 403, "permission_error", None,
     "denied by policy rule routes[0]: not on this network"),
    (b'{"model": "dead-x"}', 503, "api_error", None, "dead: unhealthy"),
    (b'{"model": "hangup"}', 502, "api_error", None, "hangup: failed before answering"),
    (b'{"model": "closed"}', 502, "api_error", None, "every target failed"),
    (b'{"model": "m1", "pad": "' + b"x" * 5000 + b'"}', 413, "invalid_request_error", None,
     "too large"),
]


@pytest.mark.parametrize(("body", "status", "kind", "param", "fragment"), CASES)
def test_bad_input_gets_openai_error(gw: Proc, http: httpx.Client, body: bytes, status: int,
                                     kind: str, param: str | None, fragment: str) -> None:
    response = http.post(gw.url + "/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind
    assert error["param"] == param
    assert fragment in error["message"]
    assert "x-myco-node" in response.headers and "x-myco-rule" in response.headers
    # ... and the gateway still serves a good request afterwards.
    ok = http.post(gw.url + "/v1/chat/completions", json={"model": "m1"}, timeout=10)
    assert ok.status_code == 200 and ok.headers["x-myco-node"] == "good"


def test_unknown_path_and_method(gw: Proc) -> None:
    assert httpx.get(gw.url + "/v1/nothing").json()["error"]["type"] == "invalid_request_error"
    response = httpx.get(gw.url + "/v1/chat/completions")
    assert response.status_code == 405 and "error" in response.json()


def test_dry_run_rejects_bad_input_like_the_real_endpoint(gw: Proc) -> None:
    response = httpx.post(gw.url + "/v1/policy/dry-run", json={"model": "m1",
                                                               "endpoint": "images"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "endpoint"


def test_concurrent_failures_do_not_disturb_good_requests(gw: Proc) -> None:
    import asyncio

    async def go() -> list[int]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            jobs = []
            for i in range(40):
                model = ("m1", "hangup", "nope", "dead-x")[i % 4]
                jobs.append(client.post("/v1/chat/completions", json={"model": model}))
            return [r.status_code for r in await asyncio.gather(*jobs)]

    statuses = asyncio.run(go())
    assert statuses == [200, 502, 404, 503] * 10

"""Real routing and dry-run agree, over a table of policies and requests.

Two fake nodes (`a` serves m1 and m2, `b` serves m2 and m3), a listed upstream that serves only
`up-model`, and a listed node nothing listens on.  For every request the dry-run's decision must
be what the real request does: same status, and the target it names is the one that answered.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from myco.identity import Identity
from tests.conftest import PolicyFactory
from tests.procs import Proc, fake_upstream, start_together, stop_all

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def fakes(gateway_identity: Identity) -> Iterator[dict[str, Proc]]:
    procs = dict(zip(["a", "b", "up"], start_together(
        lambda: fake_upstream("a", "m1", "m2", node_for=gateway_identity),
        lambda: fake_upstream("b", "m2", "m3", node_for=gateway_identity),
        lambda: fake_upstream("up", "up-model")), strict=True))
    yield procs
    stop_all(list(procs.values()))


def listing(fakes: dict[str, Proc]) -> str:
    return f"""
[nodes.a]
address = "{fakes['a'].address}"
id = "{fakes['a'].node_id}"
[nodes.b]
address = "{fakes['b'].address}"
id = "{fakes['b'].node_id}"
[nodes.dead]
address = "127.0.0.1:9"
[upstreams.lan]
url = "{fakes['up'].url}/v1"
cloud = false
models = ["up-model"]
[clients.alice]
key_env = "ALICE_KEY"
[clients.bob]
key_env = "BOB_KEY"
"""


ROUTES = {
    "ordered": """
[[routes]]
match = { model = "secret-*" }
deny = "secrets stay home"
[[routes]]
match = { model = "up-*" }
forward = ["lan"]
[[routes]]
match = { model = "m*", endpoint = "embeddings" }
forward = ["b"]
[[routes]]
match = { model = "*", tools = true }
forward = ["b", "a"]
[[routes]]
match = { model = "*" }
forward = ["dead", "a", "b"]
""",
    "by-client": """
[[routes]]
match = { model = "*", client = "alice" }
forward = ["a"]
[[routes]]
match = { model = "*", client = ["bob"], endpoint = ["chat"] }
forward = ["b"]
""",
}

REQUESTS: list[tuple[str, str, str, bool, str]] = [
    # (policy, endpoint, model, tools, client key)
    ("ordered", "chat", "m1", False, "alice"),
    ("ordered", "chat", "m3", False, "alice"),
    ("ordered", "chat", "m2", True, "alice"),
    ("ordered", "chat", "m1", True, "alice"),
    ("ordered", "completions", "m2", False, "bob"),
    ("ordered", "embeddings", "m2", False, "bob"),
    ("ordered", "embeddings", "m1", False, "bob"),
    ("ordered", "chat", "secret-plans", False, "bob"),
    ("ordered", "chat", "up-model", False, "bob"),
    ("ordered", "chat", "nobody-has-this", False, "bob"),
    ("by-client", "chat", "m1", False, "alice"),
    ("by-client", "chat", "m3", False, "bob"),
    ("by-client", "completions", "m3", False, "bob"),
    ("by-client", "chat", "m2", False, "bob"),
    ("by-client", "embeddings", "m1", False, "alice"),
]
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
         "embeddings": "/v1/embeddings"}
KEYS = {"ALICE_KEY": "key-a", "BOB_KEY": "key-b"}


@pytest.fixture(scope="module")
def gateways(fakes: dict[str, Proc], start_gateway: PolicyFactory) -> dict[str, Proc]:
    return dict(zip(ROUTES, start_together(*(
        lambda routes=routes: start_gateway(listing(fakes) + routes, env=KEYS)
        for routes in ROUTES.values())), strict=True))


@pytest.mark.parametrize(("policy", "endpoint", "model", "tools", "client"), REQUESTS)
def test_dry_run_and_real_routing_agree(gateways: dict[str, Proc], http: httpx.Client,
                                        policy: str, endpoint: str, model: str, tools: bool,
                                        client: str) -> None:
    url = gateways[policy].url
    headers = {"authorization": f"Bearer key-{client[0]}"}
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if tools:
        body["tools"] = TOOLS
    dry = http.post(url + "/v1/policy/dry-run", json={**body, "endpoint": endpoint},
                    headers=headers).json()
    real = http.post(url + PATHS[endpoint], json=body, headers=headers)
    assert real.status_code == dry["status"], (dry, real.text)
    assert real.headers["x-myco-rule"] == dry["rule_name"]
    if dry["allowed"]:
        assert real.headers["x-myco-node"] == dry["target"]
        answered = real.json()["choices"][0]["message"]["content"]
        assert answered == f"hello from {dry['target'] if dry['target'] != 'lan' else 'up'}"
    else:
        assert real.headers["x-myco-node"] == "-"
        assert real.json()["error"]["message"] == dry["message"]


def test_dry_run_explains_every_candidate(gateways: dict[str, Proc]) -> None:
    dry = httpx.post(gateways["ordered"].url + "/v1/policy/dry-run",
                     json={"model": "m2", "endpoint": "chat"},
                     headers={"authorization": "Bearer key-a"}).json()
    assert dry["rule_name"] == "routes[4]"
    assert dry["rule"] == "model=* -> forward dead, a, b"
    reasons = {c["target"]: (c["eligible"], c["chosen"], c["reason"]) for c in dry["candidates"]}
    assert reasons["dead"][0] is False and "unhealthy" in reasons["dead"][2]
    assert reasons["a"] == (True, True, "first eligible target of the route (0 in flight)")
    assert reasons["b"][2].startswith("eligible fallback #1")


def test_models_lists_what_the_policy_makes_reachable(gateways: dict[str, Proc]) -> None:
    alice = httpx.get(gateways["by-client"].url + "/v1/models",
                      headers={"authorization": "Bearer key-a"}).json()
    assert {m["id"]: m["targets"] for m in alice["data"]} == {"m1": ["a"], "m2": ["a"]}
    bob = httpx.get(gateways["ordered"].url + "/v1/models",
                    headers={"authorization": "Bearer key-b"}).json()
    assert {m["id"]: m["targets"] for m in bob["data"]} == {
        "m1": ["a"], "m2": ["a", "b"], "m3": ["b"], "up-model": ["lan"]}


def test_unknown_client_key_is_401(gateways: dict[str, Proc]) -> None:
    response = httpx.post(gateways["ordered"].url + "/v1/chat/completions",
                          json={"model": "m1"}, headers={"authorization": "Bearer wrong"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_audit_log_records_decisions_without_prompts(gateways: dict[str, Proc]) -> None:
    import json

    gw = gateways["by-client"]
    httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": "Bearer key-a"},
               json={"model": "m1", "messages": [{"role": "user", "content": "TOP-SECRET"}]})
    text = gw.audit_path.read_text()  # type: ignore[attr-defined]
    assert "TOP-SECRET" not in text
    last = json.loads(text.splitlines()[-1])
    assert {k: last[k] for k in ("endpoint", "model", "client", "rule", "target", "status")} == {
        "endpoint": "chat", "model": "m1", "client": "alice", "rule": "routes[0]",
        "target": "a", "status": 200}
    assert last["latency_ms"] > 0 and len(last["request_id"]) == 32

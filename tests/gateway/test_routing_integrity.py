"""Routing is decided by the policy alone, and a target learns nothing the policy did not allow.

Each test sends what an attacker would to a real gateway and looks at what the target received
or what the client got back:

- two `model` keys: the target reads the very model the policy resolved;
- legacy `functions`/`function_call` count as tools;
- a deny cannot be sidestepped by spelling (case, spaces, fullwidth, invisible characters);
- a target's own headers (cookies, CORS grants, `x-myco-*`) never reach the client;
- a node listed on loopback without `id` is pinned: a process squatting its port gets nothing.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.policy import Match, matches, model_key, parse
from gateway.resolve import NodeView, RoutingRequest, resolve
from myco.identity import Identity, load_or_create
from myco.tls import server_context
from tests.conftest import PolicyFactory
from tests.procs import Proc, fake_upstream, start_together, stop_all
from tests.rawserver import RawServer

JSON = {"content-type": "application/json"}
OK = (b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}')


def read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 request with a content-length: (head, body); (b"", b"") at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b"", b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
    while found and len(body) < int(found.group(1)):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head, body


def answer(content_type: bytes, body: bytes, headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\n%scontent-length: %d\r\n\r\n%s" % (
        content_type, headers, len(body), body)


class Recorder(RawServer):
    """An upstream that keeps every request body it receives, and answers a request for
    /NAME/v1/... with `ANSWERS[NAME]`."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        super().__init__(self._connection)

    def _connection(self, conn: socket.socket) -> None:
        while True:
            head, body = read_request(conn)
            if not head:
                return
            self.bodies.append(body)
            conn.sendall(ANSWERS[head.split(b"/", 2)[1].decode()])


@pytest.fixture(scope="module")
def rec() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


@pytest.fixture(scope="module")
def rec_gw(rec: Recorder, start_gateway: PolicyFactory) -> Proc:
    """Upstream NAME is the recorder's /NAME/v1 (of `ANSWERS`)."""
    return start_gateway("".join(
        f'[upstreams.{name}]\nurl = "http://127.0.0.1:{rec.port}/{name}/v1"\ncloud = false\n'
        for name in ANSWERS) + """
[[routes]]
match = { model = "secret-*" }
deny = "secrets stay home"
[[routes]]
match = { model = "hostile" }
forward = ["hostile"]
[[routes]]
match = { model = "hostile_stream" }
forward = ["hostile_stream"]
[[routes]]
forward = ["ok"]
""")


def keys_of(body: bytes) -> list[tuple[str, Any]]:
    """The top-level keys of a JSON object in the order written, repeats included."""
    pairs: list[tuple[str, Any]] = []

    def hook(found: list[tuple[str, Any]]) -> dict[str, Any]:
        pairs.extend(found)
        return dict(found)

    json.loads(body, object_pairs_hook=hook)
    return [(k, v) for k, v in pairs if k in ("model", "messages", "stream")]


# --- two `model` keys ---------------------------------------------------------------------


def test_the_target_reads_the_model_the_policy_resolved(rec: Recorder, rec_gw: Proc) -> None:
    # The last key routes; a target that reads the first would run secret-plans.
    smuggled = b'{"model": "secret-plans", "messages": [], "model": "m1"}'
    response = httpx.post(rec_gw.url + "/v1/chat/completions", content=smuggled, headers=JSON)
    assert response.status_code == 200, response.text
    assert sorted(keys_of(rec.bodies[-1])) == [("messages", []), ("model", "m1")]
    # The other order is the policy's to refuse, and nothing is sent.
    sent = len(rec.bodies)
    denied = httpx.post(rec_gw.url + "/v1/chat/completions",
                        content=b'{"model": "m1", "model": "secret-plans"}', headers=JSON)
    assert denied.status_code == 403
    assert len(rec.bodies) == sent


def test_values_are_forwarded_byte_for_byte(rec: Recorder, rec_gw: Proc) -> None:
    messages = b'[ {"role" : "user", "content": "1e999 \\u00e9 \\ud83d\\ude00"} ]'
    body = b'{"model":"m","temperature":1.000000000000000001,"n":18446744073709551616,' \
           b'"messages":' + messages + b'}'
    response = httpx.post(rec_gw.url + "/v1/chat/completions", content=body, headers=JSON)
    assert response.status_code == 200
    assert rec.bodies[-1] == body


# --- legacy tool calling ------------------------------------------------------------------

TOOLS_LOCAL = """
[[routes]]
match = { model = "*", tools = true }
forward = ["local"]
[[routes]]
match = { model = "*" }
forward = ["cloud"]
"""
FUNCTION = {"name": "f", "parameters": {"type": "object", "properties": {}}}


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Proc]]:
    procs = dict(zip(("local", "cloud"), start_together(
        lambda: fake_upstream("local", "m1"), lambda: fake_upstream("cloud", "m1")), strict=True))
    yield procs
    stop_all(list(procs.values()))


def fake_upstreams(fakes: dict[str, Proc]) -> str:
    return "".join(f'[upstreams.{n}]\nurl = "{p.url}/v1"\ncloud = {str(n == "cloud").lower()}\n'
                   for n, p in fakes.items())


@pytest.fixture(scope="module")
def tools_gw(fakes: dict[str, Proc], start_gateway: PolicyFactory) -> Proc:
    return start_gateway(fake_upstreams(fakes) + TOOLS_LOCAL)


@pytest.fixture(scope="module")
def deny_gw(fakes: dict[str, Proc], start_gateway: PolicyFactory) -> Proc:
    return start_gateway(fake_upstreams(fakes) + """
[[routes]]
match = { model = "secret-*" }
deny = "secrets stay home"
[[routes]]
match = { model = "*" }
forward = ["cloud"]
""")


@pytest.mark.parametrize(("extra", "target"), [
    ({"functions": [FUNCTION]}, "local"),
    ({"functions": [FUNCTION], "function_call": "auto"}, "local"),
    ({"function_call": {"name": "f"}}, "local"),
    ({"tools": [{"type": "function", "function": FUNCTION}]}, "local"),
    ({"functions": []}, "cloud"),
    ({}, "cloud"),
])
def test_legacy_functions_count_as_tools(tools_gw: Proc, http: httpx.Client,
                                         extra: dict[str, Any], target: str) -> None:
    gw = tools_gw
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], **extra}
    response = http.post(gw.url + "/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == f"hello from {target}"
    dry = http.post(gw.url + "/v1/policy/dry-run", json=body).json()
    assert dry["target"] == target and dry["request"]["has_tools"] == (target == "local")


# --- spelling -----------------------------------------------------------------------------

SPELLINGS = ["secret-plans", "SECRET-PLANS", "Secret-plans", " secret-plans", "secret-plans\t",
             "\uff53ecret-plans", "\uff33\uff25\uff23\uff32\uff25\uff34-plans",
             "\u200bsecret-plans", "secret\u00ad-plans", "Secret-Plan\u017f"]


@pytest.mark.parametrize("model", SPELLINGS)
def test_a_deny_cannot_be_sidestepped_by_spelling(deny_gw: Proc, http: httpx.Client,
                                                  model: str) -> None:
    response = http.post(deny_gw.url + "/v1/chat/completions", json={"model": model})
    assert response.status_code == 403, response.text
    assert response.json()["error"]["message"] == \
        "denied by policy rule routes[0]: secrets stay home"


def test_model_key_table() -> None:
    assert {model_key(s) for s in SPELLINGS} == {"secret-plans"}
    assert model_key("Gemma-3-270M-Q4_K_M") == "gemma-3-270m-q4_k_m"
    assert model_key("\ufb01ne") == "fine"  # the ligature fi
    # A pattern written in capitals matches too: both sides are folded.
    route = Match("SECRET-*", None, None, None)
    assert matches(route, "chat", model_key("secret-x"), None, False)
    assert not matches(route, "chat", model_key("secretx"), None, False)


def test_model_lists_compare_normalised() -> None:
    policy = parse("""
[nodes.n]
address = "127.0.0.1:1"
[upstreams.u]
url = "http://127.0.0.1:2/v1"
cloud = false
models = ["Up-Model"]
[[routes]]
forward = ["n", "u"]
""")
    swarm = {"n": NodeView("n", True, frozenset({"Gemma-3"}))}
    for model, target in [("gemma-3", "n"), ("GEMMA-3 ", "n"), ("up-model", "u"),
                          ("\uff35p-model", "u")]:
        decision = resolve(RoutingRequest("chat", model), policy, swarm)
        assert decision.target == target, (model, decision.message)
    assert resolve(RoutingRequest("chat", "other"), policy, swarm).status == 404


# --- response headers ---------------------------------------------------------------------

HOSTILE_HEADERS = (b"set-cookie: session=stolen; Path=/\r\n"
                   b"Set-Cookie: second=1\r\n"
                   b"access-control-allow-origin: *\r\n"
                   b"Access-Control-Allow-Credentials: true\r\n"
                   b"x-myco-node: evil\r\nx-myco-rule: evil\r\nX-Myco-Split: evil\r\n"
                   b"server: evil\r\nlocation: http://evil.example/\r\n"
                   b"x-ratelimit-remaining-requests: 7\r\n"
                   b"x-ratelimit-reset-requests: 1s\r\nx-ratelimit-reset-requests: 2s\r\n"
                   b"retry-after: 3\r\nx-request-id: upstream-1\r\n")


ANSWERS = {"ok": answer(b"application/json", OK),
           "hostile": answer(b"application/json", OK, HOSTILE_HEADERS),
           "hostile_stream": answer(b"text/event-stream", b"data: {}\n\n", HOSTILE_HEADERS)}


@pytest.mark.parametrize(("model", "rule"), [("hostile", 1), ("hostile_stream", 2)])
def test_only_allowlisted_response_headers_pass(rec_gw: Proc, model: str, rule: int) -> None:
    response = httpx.post(rec_gw.url + "/v1/chat/completions",
                          json={"model": model, "stream": model.endswith("stream")})
    assert response.status_code == 200
    headers = response.headers
    for name in ("set-cookie", "access-control-allow-origin",
                 "access-control-allow-credentials", "x-myco-split", "location"):
        assert name not in headers, name
    assert "evil" not in headers.get("server", "")
    assert headers.get_list("x-myco-node") == [model]
    assert headers.get_list("x-myco-rule") == [f"routes[{rule}]"]
    assert headers["x-ratelimit-remaining-requests"] == "7"
    assert headers["x-ratelimit-reset-requests"] == "1s, 2s"  # repeated: both kept, in order
    assert headers["retry-after"] == "3"
    assert re.fullmatch("[0-9a-f]{32}", headers["x-request-id"])  # the gateway's own


# --- loopback nodes are pinned ------------------------------------------------------------


class Squatter(RawServer):
    """A process on the node's port with its own certificate, trusting the gateway (the
    worst case): it counts the bytes it is sent once TLS is up."""

    def __init__(self, identity: Identity, gateway: Identity) -> None:
        self.context = server_context(identity, [gateway.pem()])
        self.received = 0
        self.handshakes = 0
        self.lock = threading.Lock()
        super().__init__(self._connection)

    def _connection(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                with self.lock:
                    self.handshakes += 1
                while data := tls.recv(65536):
                    with self.lock:
                        self.received += len(data)
        except (OSError, ssl.SSLError):
            pass


def pinned_node_policy(port: int) -> str:
    return f'[nodes.local]\naddress = "127.0.0.1:{port}"\n[[routes]]\nforward = ["local"]\n'


def swarm_node(gw: Proc) -> dict[str, Any]:
    node: dict[str, Any] = httpx.get(gw.url + "/v1/swarm").json()["nodes"][0]
    return node


def test_a_squatter_on_the_local_node_port_gets_nothing(
        tmp_path: Path, gateway_identity: Identity, start_gateway: PolicyFactory) -> None:
    squatter = Squatter(load_or_create(tmp_path / "squatter", "squatter"), gateway_identity)
    local = load_or_create(tmp_path / "node", "the real node")
    try:
        gw = start_gateway(pinned_node_policy(squatter.port),
                           env={"MYCO_GATEWAY_LOCAL_NODE_ID": local.id})
        response = httpx.post(gw.url + "/v1/chat/completions",
                              json={"model": "m", "messages": [{"role": "user",
                                                                "content": "PROMPT"}]})
        assert squatter.handshakes > 0  # it was asked who it is...
        assert squatter.received == 0  # ...and sent nothing: no health check, no prompt
        assert response.status_code == 503
        assert "identity mismatch" in response.json()["error"]["message"]
        node = swarm_node(gw)
        assert node["id"] == local.id and not node["healthy"]
    finally:
        squatter.close()


def node_with_state(state: Path, gateway: Identity) -> Proc:
    return Proc([sys.executable, "-m", "bench.fake_upstream", "--name", "local", "--model",
                 "m1", "--tls-state", str(state), "--trust", gateway.cert_path])


@pytest.mark.slow  # a node process and a gateway of its own
def test_without_a_setting_the_node_default_identity_pins_it(
        tmp_path: Path, gateway_identity: Identity, start_gateway: PolicyFactory) -> None:
    # The node keeps its identity in $XDG_STATE_HOME/mycoswarm/node (nodeagent/settings.py).
    node = node_with_state(tmp_path / "mycoswarm" / "node", gateway_identity)
    try:
        gw = start_gateway(pinned_node_policy(int(node.address.split(":")[1])),
                           env={"XDG_STATE_HOME": str(tmp_path)})
        response = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m1"})
        assert response.status_code == 200, response.text
        assert swarm_node(gw)["id"] == load_or_create(tmp_path / "mycoswarm" / "node", "").id
    finally:
        node.stop()


@pytest.mark.slow  # a node process and a gateway of its own
def test_no_known_local_id_is_unhealthy_saying_to_add_it(
        tmp_path: Path, gateway_identity: Identity, start_gateway: PolicyFactory) -> None:
    elsewhere = node_with_state(tmp_path / "elsewhere", gateway_identity)
    try:
        gw = start_gateway(pinned_node_policy(int(elsewhere.address.split(":")[1])),
                           env={"XDG_STATE_HOME": str(tmp_path / "empty")})
        response = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m1"})
        assert response.status_code == 503
        assert "add `id" in response.json()["error"]["message"]
        node = swarm_node(gw)
        assert not node["healthy"] and "MYCO_GATEWAY_LOCAL_NODE_ID" in node["reason"]
    finally:
        elsewhere.stop()

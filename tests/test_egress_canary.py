"""The egress canary: nothing goes anywhere the policy did not allow, whatever the input.

A gateway whose policy lists exactly one upstream (a recording fake OpenAI server) is sent
every hostile input of issue 9, while listeners on the other loopback addresses and ports it
could be tricked into (the node's default port, 80, 443, 8080, Ollama's 11434, the gateway's
and the upstream's own ports, on 127.0.0.1-127.0.0.20 and ::1) record every connection.

- No listener receives a connection.
- The upstream reads only what the policy resolved: one `model` key (however it is spelt in
  the JSON), a model no deny rule matches in any spelling, no tools, no legacy `functions`,
  nothing from a request that had to be refused, and its own `Host`.
- Every answer is quick, never a 500, an error is OpenAI's envelope and echoes no megabytes,
  and none opens the gateway to other sites (CORS), sets cookies or carries `x-myco-*`
  headers but the gateway's own, whatever the upstream answers with.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import threading
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import PolicyFactory

pytestmark = pytest.mark.slow  # listeners on 21 addresses x 8 ports, and hostile traffic

ALLOWED = "pub-model"
DENIED = "secret-*"  # the policy's deny rule
TIMEOUT = 10.0
ADDRESSES = [f"127.0.0.{i}" for i in range(1, 21)] + ["::1"]
PORTS = [80, 443, 8080, 8787, 8788, 11434]  # plus the gateway's and the upstream's
PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
HOSTILE_HEADERS = {"set-cookie": "session=upstream", "access-control-allow-origin": "*",
                   "access-control-allow-credentials": "true", "x-myco-node": "local",
                   "x-myco-rule": "routes[99]"}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Upstream(ThreadingHTTPServer):
    """A fake OpenAI server that records every request it reads."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[Received] = []
        self.port: int = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Upstream

    def do_POST(self) -> None:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.received.append(Received(self.path, {k.lower(): v for k, v in
                                                         self.headers.items()}, body))
        try:
            model = str(json.loads(body).get("model"))[:64]
            status, answer = 200, {
                "id": "chatcmpl-canary", "object": "chat.completion", "created": 0,
                "model": model, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": "hello from the upstream"}}]}
        except (ValueError, AttributeError, RecursionError):
            status, answer = 400, {"error": {"message": "bad body", "type": "invalid_request_error",
                                             "param": None, "code": None}}
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        for name, value in HOSTILE_HEADERS.items():  # a misbehaving upstream
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST

    def log_message(self, *_: Any) -> None:
        pass


@dataclass
class Hit:
    listener: str
    peer: str
    owner: str  # the connecting process, as far as the kernel tells


@dataclass
class Listeners:
    """Listening sockets on many loopback address:port pairs; each connection is accepted,
    attributed to its process, recorded and closed at once (so a gateway that was tricked
    fails fast rather than hanging)."""

    bound: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def listen(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            self.skipped.append(f"{label} ({exc.strerror})")
            return
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ, label)
        self.bound.append((host, port))

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.fileobj is self._wake_r:
                    self._accept_pending()
                    return
                self._accept(key)

    def _accept(self, key: selectors.SelectorKey) -> None:
        assert isinstance(key.fileobj, socket.socket)
        with contextlib.suppress(BlockingIOError):
            conn, peer = key.fileobj.accept()
            with conn:
                self.hits.append(Hit(key.data, f"{peer[0]}:{peer[1]}", _owner(peer)))

    def _accept_pending(self) -> None:
        """Connections the kernel completed that the loop has not accepted yet."""
        for key, _ in self._selector.select(timeout=0):
            if key.fileobj is not self._wake_r:
                self._accept(key)

    def close(self) -> None:
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join(5)
        for key in list(self._selector.get_map().values()):
            assert isinstance(key.fileobj, socket.socket)
            key.fileobj.close()
        self._selector.close()
        self._wake_w.close()


def _owner(peer: tuple[Any, ...]) -> str:
    """The process holding the connecting end of `peer`, for the report."""
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and (conn.laddr.ip, conn.laddr.port) == peer[:2] and conn.pid:
                return f"pid {conn.pid}: {' '.join(psutil.Process(conn.pid).cmdline())[:200]}"
    return "unknown process"


def normal(model: str) -> str:
    """A model name as a deny rule must see it: NFKC, case folded, no outer white space."""
    return unicodedata.normalize("NFKC", model).casefold().strip()


def pairs(raw: bytes) -> list[tuple[str, Any]]:
    """The top-level members of a JSON object, duplicates kept, in order."""
    found: list[list[tuple[str, Any]]] = []

    def keep(members: list[tuple[str, Any]]) -> dict[str, Any]:
        found.append(members)
        return dict(members)

    json.loads(raw, object_pairs_hook=keep)
    return found[-1]  # the outermost object is built last


@dataclass
class Attack:
    """One hostile request.  `refused`: a correct gateway answers 4xx and forwards nothing
    of it (checked by its marker); else it may be forwarded, if the upstream's reading of
    it is one the policy resolved."""

    name: str
    body: bytes
    path: str = "/v1/chat/completions"
    headers: dict[str, str] = field(default_factory=dict)
    refused: bool = True
    method: str = "POST"
    raw_target: str | None = None  # sent on a raw socket with this request-target

    @property
    def marker(self) -> str:
        return marker(self.name)


def marker(name: str) -> str:
    """What a request named `name` carries in its prompt, to be found wherever it goes."""
    return "canary[" + "".join(c if c.isalnum() else "-" for c in name) + "]"


def chat(name: str, model: Any = ALLOWED, text: str = "", **extra: Any) -> bytes:
    return json.dumps({"model": model, "max_tokens": 4, **extra,
                       "messages": [{"role": "user", "content": marker(name) + text}]}).encode()


def attacks() -> list[Attack]:
    out: list[Attack] = []

    def add(name: str, body: bytes | None = None, **kw: Any) -> None:
        out.append(Attack(name, chat(name) if body is None else body, **kw))

    def msgs(name: str) -> str:
        return json.dumps([{"role": "user", "content": marker(name)}])

    # Routing decided by something other than the policy.
    for name, first, last in (("dup secret first", "secret-plans", ALLOWED),
                              ("dup secret last", ALLOWED, "secret-plans")):
        add(name, f'{{"model":"{first}","model":"{last}","max_tokens":4,'
                  f'"messages":{msgs(name)}}}'.encode(), refused=False)
    add("dup escaped key", f'{{"model":"{ALLOWED}","mod\\u0065l":"secret-plans",'
                           f'"messages":{msgs("dup escaped key")}}}'.encode(), refused=False)
    add("dup tools", f'{{"model":"{ALLOWED}","tools":[{{"type":"function","function":'
                     f'{{"name":"f"}}}}],"tools":[],"messages":{msgs("dup tools")}}}'.encode(),
        refused=False)
    add("legacy functions", chat("legacy functions", functions=[
        {"name": "f", "parameters": {"type": "object"}}], function_call="auto"))
    add("functions beside null tools", chat("functions beside null tools", tools=None,
                                            functions=[{"name": "f"}]))
    for spelling in ("SECRET-PLANS", "Secret-plans", " secret-plans", "secret-plans\t",
                     "\uff53ecret-plans", "\uff33\uff25\uff23\uff32\uff25\uff34\uff0dplans",
                     "\u017fecret-plans", "secret-" + "x" * (4 << 20)):
        name = f"spelling {spelling[:20]!a}"
        add(name, chat(name, model=spelling))
        add(name + " embeddings", json.dumps({"model": spelling,
                                              "input": marker(name + " embeddings")}).encode(),
            path="/v1/embeddings")
        add(name + " completions", json.dumps({"model": spelling, "max_tokens": 4, "prompt":
                                               marker(name + " completions")}).encode(),
            path="/v1/completions")
    # A web page in the user's browser: a rebound name, a simple (unpreflighted) POST.
    for host in ("evil.example", "evil.example:8787", "127.0.0.1.evil.example", "0"):
        add(f"host {host}", headers={"host": host})
        add(f"host {host} policy", b"", path="/v1/policy", method="GET",
            headers={"host": host})
        add(f"host {host} swarm", b"", path="/v1/swarm", method="GET", headers={"host": host})
    for kind in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x"):
        add(f"content type {kind}", headers={"content-type": kind,
                                             "origin": "http://evil.example"})
    add("preflight", b"", method="OPTIONS", refused=False, headers={
        "origin": "http://evil.example", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type"})
    # One request against everyone.
    add("huge model name", chat("huge model name", model="m" * (4 << 20)), refused=False)
    add("deep json", chat("deep json")[:-1] + b',"metadata":' + b"[" * 1000 + b"]" * 1000 + b"}",
        refused=False)
    add("deeper json", b'{"model":"' + ALLOWED.encode() + b'","x":' + b"[" * 100_000 +
        b"]" * 100_000 + b"}", refused=False)
    for budget in (0, -1, None, 2**63, 2**64, "8", 8.5, True):
        name = f"max_tokens {budget!r}"
        add(name, chat(name, max_tokens=budget), refused=False)
        add(name + " completion", chat(name + " completion", max_completion_tokens=budget),
            refused=False)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    add("1000 tools", chat("1000 tools", tools=[tool] * 1000))
    add("quote in tool name", chat("quote in tool name", tools=[
        {"type": "function", "function": {"name": 'a"b', "parameters": {}}}]))
    for name, schema in (("enum []", {"enum": []}),
                         ("recursive $ref", {"$ref": "#/$defs/a", "$defs": {"a": {
                             "type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}}}})):
        add(f"schema {name}", chat(f"schema {name}", response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
            refused=False)
    add("prompt longer than any context", chat("prompt longer than any context",
                                               text=" word" * 200_000), refused=False)
    # Addresses smuggled in the request: a destination is never derived from it.
    for model in ("127.0.0.2:8788", "http://127.0.0.3:11434/v1", "local", "../../node",
                  "127.0.0.1:8788/v1/chat/completions"):
        add(f"model {model}", chat(f"model {model}", model=model), refused=False)
    split = json.dumps({"n_gpu_layers": 1, "tensor_split": [1], "workers": [
        {"node": "w", "id": "x", "host": "127.0.0.4", "tunnel_port": 8788}]})
    add("forwarding headers", refused=False, headers={
        "x-myco-split": split, "x-forwarded-host": "127.0.0.5:8080",
        "forwarded": "host=127.0.0.6:8080", "x-myco-node": "local",
        "cookie": f"session={marker('forwarding headers')}",
        "authorization": f"Bearer {marker('forwarding headers')}"})
    add("absolute-form target", refused=False,
        raw_target="http://127.0.0.7:8080/v1/chat/completions")
    add("double-slash target", refused=False, raw_target="//127.0.0.8:8788/v1/chat/completions")
    add("query target", refused=False,
        raw_target="/v1/chat/completions?base_url=http://127.0.0.9:8080/v1")
    return out


def send(client: httpx.Client, base: str, attack: Attack) -> tuple[int, dict[str, str], bytes]:
    if attack.raw_target is not None:
        return send_raw(base, attack)
    headers = {"content-type": "application/json", **attack.headers}
    response = client.request(attack.method, f"{base}{attack.path}", content=attack.body or None,
                              headers=headers)
    return response.status_code, dict(response.headers), response.content


def send_raw(base: str, attack: Attack) -> tuple[int, dict[str, str], bytes]:
    """The request on a socket of its own, with a request-target httpx would not send."""
    host, port = base.split("://", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(f"POST {attack.raw_target} HTTP/1.1\r\nhost: {host}:{port}\r\n"
                     f"content-type: application/json\r\ncontent-length: {len(attack.body)}\r\n"
                     f"connection: close\r\n\r\n".encode() + attack.body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def envelope_ok(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
        return set(error) == {"message", "type", "param", "code"} and \
            isinstance(error["message"], str)
    except (ValueError, KeyError, TypeError):
        return False


def judge_answer(attack: Attack, status: int, headers: dict[str, str], body: bytes,
                 elapsed: float) -> list[str]:
    problems = []
    if status >= 500:
        problems.append(f"status {status}: {body[:200]!r}")
    if attack.refused and not 400 <= status < 500:
        problems.append(f"must be refused with a 4xx, got {status}: {body[:200]!r}")
    if status >= 400 and attack.method != "OPTIONS" and not envelope_ok(body):
        problems.append(f"error not in OpenAI's envelope: {body[:200]!r}")
    if status >= 400 and len(body) > 64 * 1024:
        problems.append(f"error body of {len(body)} bytes echoes the input")
    for name in headers:
        if name.lower().startswith("access-control-allow") or name.lower() == "set-cookie":
            problems.append(f"answer carries {name}: {headers[name]}")
    rules = {"none", "routes[0]", "routes[1]", "routes[2]"}  # the canary policy's
    for name, own in (("x-myco-node", {"cloud", "-"}), ("x-myco-rule", rules)):
        if name in headers and headers[name] not in own:
            problems.append(f"answer carries {name}: {headers[name]}, not the gateway's own")
    if elapsed > TIMEOUT / 2:
        problems.append(f"took {elapsed:.1f} s")
    return problems


def judge_received(got: Received, upstream_port: int, refused_markers: set[str]) -> list[str]:
    """What the upstream must never read."""
    problems = []
    if got.path not in PATHS:
        problems.append(f"path {got.path!r}")
    if got.headers.get("host") != f"127.0.0.1:{upstream_port}":
        problems.append(f"Host {got.headers.get('host')!r}")
    text = got.body.decode("utf-8", "replace") + json.dumps(got.headers)
    problems += [f"carries {m}, from a request that had to be refused"
                 for m in refused_markers if m in text]
    if marker("forwarding headers") in json.dumps(got.headers):
        problems.append("client's cookie/authorization forwarded")
    try:
        members = pairs(got.body)
    except (ValueError, RecursionError):
        return [*problems, "body is not JSON the upstream can read"]
    models = [v for k, v in members if k == "model"]
    if len(models) != 1:
        problems.append(f"{len(models)} `model` keys: {[str(m)[:40] for m in models]}")
    for model in models:
        if isinstance(model, str) and fnmatchcase(normal(model), DENIED):
            problems.append(f"model {model[:40]!r}, which the deny rule {DENIED} matches")
    for key, value in members:
        if key in ("tools", "functions") and value:
            problems.append(f"non-empty `{key}`, which the policy keeps local")
    return problems


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.shutdown()
    server.server_close()


def test_nothing_leaves_but_to_the_listed_upstream(start_gateway: PolicyFactory,
                                                    upstream: Upstream) -> None:
    started = time.monotonic()
    gateway = start_gateway(f"""
[upstreams.cloud]
url = "http://127.0.0.1:{upstream.port}/v1"
cloud = true

[[routes]]
match = {{ model = "{DENIED}" }}
deny = "secret plans stay home"

[[routes]]
match = {{ model = "*", tools = true }}
deny = "tool use stays local"

[[routes]]
match = {{ model = "*" }}
forward = ["cloud"]
""")
    gateway_port = int(gateway.url.rsplit(":", 1)[1])
    listeners = Listeners()
    for host in ADDRESSES:
        for port in (*PORTS, upstream.port, gateway_port):
            if host != "127.0.0.1" or port not in (upstream.port, gateway_port):
                listeners.listen(host, port)
    assert len(listeners.bound) >= 100, f"only {listeners.bound} could be bound"
    listeners.start()
    problems: list[str] = []
    hostile = attacks()
    try:
        # The listeners hear: a connection of ours is recorded before it is closed.
        with socket.create_connection(listeners.bound[0], timeout=TIMEOUT) as probe:
            assert probe.recv(1) == b""
        assert len(listeners.hits) == 1, "the listeners are deaf"
        listeners.hits.clear()
        with httpx.Client(timeout=TIMEOUT) as client:
            # The canary works: an honest request reaches the upstream, and only it.
            honest = client.post(f"{gateway.url}/v1/chat/completions", content=chat("honest"),
                                 headers={"content-type": "application/json"})
            assert honest.status_code == 200, honest.text
            assert len(upstream.received) == 1
            for attack in hostile:
                begin = time.monotonic()
                try:
                    status, headers, body = send(client, gateway.url, attack)
                except (httpx.HTTPError, OSError) as exc:
                    problems.append(f"{attack.name}: no answer ({type(exc).__name__}: {exc})")
                    continue
                problems += [f"{attack.name}: {p}" for p in judge_answer(
                    attack, status, headers, body, time.monotonic() - begin)]
    finally:
        listeners.close()
    refused = {a.marker for a in hostile if a.refused}
    for got in upstream.received:
        problems += [f"upstream read {got.body[:120]!r}...: {p}"
                     for p in judge_received(got, upstream.port, refused)]
    problems += [f"connection to {hit.listener} from {hit.peer} ({hit.owner})"
                 for hit in listeners.hits]
    print(f"egress canary: {len(hostile)} attacks, {len(listeners.bound)} listeners "
          f"(skipped: {listeners.skipped or 'none'}), {len(upstream.received)} requests "
          f"forwarded, {time.monotonic() - started:.1f} s")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)

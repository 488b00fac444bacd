"""A web page in the user's browser against the gateway: DNS rebinding (a page whose name now
resolves to the gateway reads it as same-origin, but still sends its own `Host`), cross-site
POSTs that need no CORS preflight (`text/plain`, forms), and CORS only for origins the policy
names.  Each attack is sent as the browser would send it, to a real gateway."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.policy import PolicyError, parse
from myco.guard import host_allowed
from tests.conftest import PolicyFactory
from tests.procs import Proc
from tests.rawserver import RawServer

ANSWER = b'{"object": "chat.completion", "choices": []}'


def _answer(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawServer]:
    """The model: `accepted` counts the requests that reached it."""
    server = RawServer(_answer)
    yield server
    server.close()


def policy(upstream: RawServer, extra: str = "") -> str:
    return f"""
[upstreams.model]
url = "http://127.0.0.1:{upstream.port}/v1"
cloud = false
[[routes]]
match = {{ model = "*" }}
forward = ["model"]
{extra}"""


@pytest.fixture(scope="module")
def gw(start_gateway: PolicyFactory, upstream: RawServer) -> Proc:
    return start_gateway(policy(upstream), env={"MYCO_GATEWAY_ALLOWED_HOSTS": "gw.lan, Box.Lan"})


def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize("path", ["/v1/policy", "/v1/swarm", "/v1/models", "/health"])
def test_a_rebound_name_reads_nothing(gw: Proc, http: httpx.Client, path: str) -> None:
    port = gw.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example",
                 "127.0.0.1.nip.io", "gw.lan.evil.example"):
        response = http.get(gw.url + path, headers={"host": host})
        error = refused(response, 400, "host_not_allowed")
        assert error["param"] == "Host" and "rule" not in response.text
    for host in ("localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}",
                 f"[::1]:{port}", "[::1]", "LOCALHOST.", "gw.lan", f"box.lan:{port}"):
        assert http.get(gw.url + path, headers={"host": host}).status_code == 200, host


def test_the_refusal_does_not_echo_a_long_host(gw: Proc, http: httpx.Client) -> None:
    response = http.get(gw.url + "/v1/policy", headers={"host": "a" * 5000 + ".example"})
    assert len(refused(response, 400, "host_not_allowed")["message"]) < 400


@pytest.mark.parametrize("content_type", [
    "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", None, "application/json-patch", "text/json"])
def test_a_cross_site_post_never_runs_the_model(gw: Proc, upstream: RawServer,
                                               http: httpx.Client,
                                               content_type: str | None) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    before = upstream.accepted
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                 "/v1/policy/dry-run"):
        response = http.post(gw.url + path, content=body, headers=headers)
        assert refused(response, 415, "unsupported_media_type")["param"] == "Content-Type"
    assert upstream.accepted == before
    # The same request as JSON runs the model: the refusal above was the content type's.
    ok = http.post(gw.url + "/v1/chat/completions", content=body,
                    headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200 and upstream.accepted == before + 1


def test_a_duplicate_content_type_is_refused(gw: Proc) -> None:
    sock = socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
    with sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n"
                     b"content-type: application/json\r\ncontent-type: text/plain\r\n"
                     b"content-length: 2\r\nconnection: close\r\n\r\n{}")
        assert sock.recv(65536).startswith(b"HTTP/1.1 415 ")


def preflight(http: httpx.Client, url: str, origin: str) -> httpx.Response:
    return http.options(url + "/v1/chat/completions", headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "content-type, authorization"})


def cors_headers(response: httpx.Response) -> list[str]:
    return [name for name in response.headers if name.startswith("access-control-")]


def test_no_cors_headers_unless_the_policy_names_origins(gw: Proc, http: httpx.Client) -> None:
    assert cors_headers(preflight(http, gw.url, "http://evil.example")) == []
    for response in (http.get(gw.url + "/v1/models", headers={"origin": "http://evil.example"}),
                     http.post(gw.url + "/v1/chat/completions", json={"model": "m"},
                                headers={"origin": "http://evil.example"})):
        assert response.status_code == 200 and cors_headers(response) == []


def test_cors_for_the_named_origins_only(start_gateway: PolicyFactory, upstream: RawServer,
                                         http: httpx.Client) -> None:
    proc = start_gateway(policy(upstream, '[cors]\norigins = ["http://app.example:3000"]\n'))
    allowed = preflight(http, proc.url, "http://app.example:3000")
    assert allowed.status_code < 300
    assert allowed.headers["access-control-allow-origin"] == "http://app.example:3000"
    assert "access-control-allow-origin" not in \
        preflight(http, proc.url, "http://evil.example").headers
    answer = http.post(proc.url + "/v1/chat/completions", json={"model": "m"},
                        headers={"origin": "http://app.example:3000"})
    assert answer.headers["access-control-allow-origin"] == "http://app.example:3000"
    # CORS does not lift the other checks: a page there still cannot skip the preflight.
    plain = http.post(proc.url + "/v1/chat/completions", content=b'{"model": "m"}',
                       headers={"origin": "http://app.example:3000",
                                "content-type": "text/plain"})
    refused(plain, 415, "unsupported_media_type")


@pytest.mark.parametrize("origin", ["*", "http://*.example", "http://app.example/",
                                    "http://app.example/path", "app.example", "file://x"])
def test_cors_origins_must_be_origins(origin: str) -> None:
    with pytest.raises(PolicyError, match=r"<policy>:\d+: cors.origins: .* must be an origin"):
        parse(f'[cors]\norigins = ["{origin}"]\n[[routes]]\nforward = ["x"]\n'
              '[upstreams.x]\nurl = "http://127.0.0.1:1/v1"\ncloud = false\n')


def own_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_listening_everywhere_serves_the_machines_own_names(start_gateway: PolicyFactory,
                                                          upstream: RawServer,
                                                          http: httpx.Client) -> None:
    address = own_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    proc = start_gateway(policy(upstream), env={"MYCO_GATEWAY_HOST": "0.0.0.0"})
    port = proc.url.rsplit(":", 1)[1]
    url = f"http://{address}:{port}/v1/swarm"
    for host in (f"{address}:{port}", socket.gethostname(), f"{socket.gethostname()}.local",
                 f"localhost:{port}"):
        assert http.get(url, headers={"host": host}).status_code == 200, host
    refused(http.get(url, headers={"host": f"evil.example:{port}"}), 400, "host_not_allowed")
    for host in ("10.99.99.99", f"0.0.0.0:{port}"):
        refused(http.get(url, headers={"host": host}), 400, "host_not_allowed")


@pytest.mark.parametrize(("host", "server", "allowed"), [
    ("192.168.1.5:8787", "192.168.1.5", True),  # the address the client connected to
    ("192.168.1.5", "::ffff:192.168.1.5", True),  # ... on a dual-stack socket
    ("[fd00::2]:8787", "fd00::2", True),
    ("192.168.1.6", "192.168.1.5", False),  # another machine's address
    ("127.0.0.2", "192.168.1.5", True), ("[::1]", None, True), ("LocalHost.:1", None, True),
    ("gw.lan", "127.0.0.1", True), ("gw.lan.", "127.0.0.1", True), ("evil.gw.lan", None, False),
    ("", "127.0.0.1", False), ("[", "127.0.0.1", False), (None, "127.0.0.1", True)])
def test_host_allowed(host: str | None, server: str | None, allowed: bool) -> None:
    assert host_allowed(host, server, frozenset({"gw.lan"})) is allowed


def test_the_node_takes_json_only(node: Proc, node_tls: ssl.SSLContext) -> None:
    with httpx.Client(verify=node_tls, base_url=node.url) as client:
        for path in ("/v1/chat/completions", "/node/rpc/lease"):
            response = client.post(path, content=b'{"model": "x"}',
                                   headers={"content-type": "text/plain"})
            refused(response, 415, "unsupported_media_type")
        assert client.get("/health", headers={"host": "anything.example"}).status_code == 200

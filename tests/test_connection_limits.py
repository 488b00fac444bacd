"""Connections against both servers (myco/limits.py), from a raw-socket client: a slowloris of
half-sent requests is closed after the header timeout while honest requests still answer;
oversized headers and too many headers are refused with 431 and the connection is cut before
the attacker has sent it all; open connections are bounded."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import PolicyFactory
from tests.procs import Proc, wait_for

pytestmark = pytest.mark.slow  # it waits out header timeouts, and fills the socket buffers

HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 40
LIMITS = {"MYCO_GATEWAY_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
          "MYCO_GATEWAY_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
          "MYCO_GATEWAY_MAX_HEADERS": "50", "MYCO_GATEWAY_MAX_HEADER_BYTES": "8192"}
POLICY = '[nodes.n]\naddress = "127.0.0.1:9"\n[[routes]]\nforward = ["n"]\n'
HALF = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: applic"


@pytest.fixture(scope="module")
def gw(start_gateway: PolicyFactory) -> Proc:
    return start_gateway(POLICY, env=LIMITS)


def address(proc: Proc) -> tuple[str, int]:
    host, port = proc.address.rsplit(":", 1)
    return host, int(port)


def connect(proc: Proc) -> socket.socket:
    sock = socket.create_connection(address(proc), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST on close
    return sock


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset ends it too)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def one_response(sock: socket.socket) -> bytes:
    """One response with a content-length, read from a kept-alive connection."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    length = int(raw.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(raw.partition(b"\r\n\r\n")[2]) < length:
        raw += sock.recv(65536)
    return raw


def error_of(raw: bytes) -> tuple[int, dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def honest(proc: Proc) -> None:
    assert httpx.get(proc.url + "/health", timeout=2).status_code == 200


def served(proc: Proc) -> bool:
    try:
        return httpx.get(proc.url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:  # refused, or reset (the refusal is sent before the request)
        return False


def is_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed `sock` nor answered on it."""
    sock.settimeout(0)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        pass
    return False


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_a_slowloris_is_closed_while_honest_requests_answer(
        gw: Proc, socks: list[socket.socket]) -> None:
    started = time.monotonic()
    for i in range(MAX_CONNECTIONS - 10):
        socks.append(connect(gw))
        socks[-1].sendall(HALF if i % 2 else b"")  # half of them send nothing at all
    honest(gw)
    if time.monotonic() - started < HEADER_TIMEOUT / 2:  # (a loaded machine may be slower)
        assert all(is_open(sock) for sock in socks), "closed before the header timeout"
    # Trickling a byte now and then buys no time: the deadline is the headers' own.
    while any(is_open(sock) for sock in socks) and time.monotonic() - started < 10:
        for sock in socks[1::2]:
            with contextlib.suppress(OSError):
                sock.sendall(b"a")
        honest(gw)
        time.sleep(0.2)
    assert time.monotonic() - started < 10, "a slowloris is still connected"
    for sock in socks:
        sock.settimeout(1)
        assert answer(sock) == b"", "a half-sent request got an answer"
    honest(gw)


def test_keep_alive_requests_get_the_timeout_afresh(gw: Proc,
                                                    socks: list[socket.socket]) -> None:
    socks.append(connect(gw))
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    for _ in range(2):  # 2 x 0.6 timeouts: longer than one, yet each request is on time
        time.sleep(HEADER_TIMEOUT * 0.6)
        socks[0].sendall(request)
        assert one_response(socks[0]).startswith(b"HTTP/1.1 200 ")
    socks[0].sendall(request[:20])
    socks[0].settimeout(HEADER_TIMEOUT + 5)
    started = time.monotonic()
    assert answer(socks[0]) == b""
    assert time.monotonic() - started <= HEADER_TIMEOUT + 1


def send_until_cut(sock: socket.socket, head: bytes, filler: bytes, total: int) -> int:
    """Send `head`, then `filler` up to `total` bytes, until the server cuts the connection;
    the bytes sent."""
    sent = 0
    try:
        sock.sendall(head)
        while sent < total:
            sent += sock.send(filler)
    except TimeoutError:
        raise
    except OSError:  # reset, broken pipe, or TLS's EOF
        pass
    return sent


@pytest.mark.parametrize(("filler", "code"), [(b"a" * 65536, "header_too_large"),
                                              (b"x: y\r\n" * 10000, "header_too_large")])
def test_a_huge_header_block_is_refused_before_it_is_all_sent(gw: Proc, filler: bytes,
                                                              code: str) -> None:
    """A 64 MiB header value, or 100,000 headers: 431 once over the limit, and the connection
    is cut long before the attacker has sent everything."""
    with connect(gw) as sock:
        sock.settimeout(5)
        sent = send_until_cut(sock, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: ",
                              filler, 64 * 2**20)
        raw = answer(sock)
    assert sent < 16 * 2**20  # at most what the socket buffers hold
    if raw:  # the answer can be lost to the reset the cut causes
        status, error = error_of(raw)
        assert status == 431 and error["code"] == code
    honest(gw)


@pytest.mark.parametrize(("extra", "code"), [
    (b"".join(b"x-%d: y\r\n" % i for i in range(60)), "too_many_headers"),
    (b"x-big: " + b"a" * 9000 + b"\r\n", "header_too_large"),
    (b"x-a: " + b"a" * 3000 + b"\r\nx-b: " + b"b" * 3000 + b"\r\nx-c: " + b"c" * 3000 + b"\r\n",
     "header_too_large")])
def test_too_many_or_too_large_headers_get_431(gw: Proc, extra: bytes, code: str) -> None:
    with connect(gw) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 2\r\n" + extra +
                     b"\r\n{}")
        status, error = error_of(answer(sock))
    assert status == 431 and error["code"] == code
    assert error["type"] == "invalid_request_error" and "aaaa" not in error["message"]


def test_a_request_under_the_limits_with_a_large_body_is_served(gw: Proc) -> None:
    headers = {f"x-{i}": "v" for i in range(40)}
    response = httpx.post(gw.url + "/v1/policy/dry-run", headers=headers,
                          json={"model": "m", "pad": "x" * 200_000})
    assert response.status_code == 200, response.text


def test_open_connections_are_bounded(gw: Proc, socks: list[socket.socket]) -> None:
    socks.extend(connect(gw) for _ in range(MAX_CONNECTIONS - 1))
    socks.append(connect(gw))  # the last: once it is served, the server holds them all
    socks[-1].sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert one_response(socks[-1]).startswith(b"HTTP/1.1 200 ")
    for _ in range(3):
        with connect(gw) as extra:  # refused on arrival: sending first could reset the answer
            status, error = error_of(answer(extra))
        assert status == 503 and error["code"] == "too_many_connections"
    for sock in socks:
        sock.close()
    wait_for(lambda: served(gw), 5, "served again once the connections closed")


def test_the_node_has_the_same_limits(node: Proc, node_tls: ssl.SSLContext) -> None:
    host, port = address(node)
    with node_tls.wrap_socket(socket.create_connection((host, port), timeout=10),
                              server_hostname=None) as sock:
        sent = send_until_cut(sock, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: ",
                              b"a" * 16384, 64 * 2**20)
        try:
            raw = answer(sock)
        except (ssl.SSLError, OSError):
            raw = b""
    assert sent < 16 * 2**20
    if raw:
        assert error_of(raw)[0] == 431

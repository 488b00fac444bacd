"""What one request can cost the gateway is bounded, and what it leaves behind is private.

- A target's answer that is not streamed is buffered up to a limit; beyond it the client gets a
  502 naming the limit and the target's connection is closed.  A stream passes unbuffered.
- A 4 MiB model name is neither echoed in the error nor copied into the audit log.
- The audit log is readable by its owner only.
- A client that leaves while a non-streamed answer is pending closes the target's connection
  at once, so the next hop sees the disconnect and can stop working.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from myco.identity import Identity
from tests.conftest import PolicyFactory
from tests.procs import Proc, myco, stop_all
from tests.rawserver import RawServer

LIMIT = 4096


class Upstream(RawServer):
    """A raw upstream that answers a request for /NAME/v1/... with the function NAME (of
    `ANSWERS`); `peer_gone[NAME]` is set when its peer goes (a send fails, a read sees the end)."""

    def __init__(self) -> None:
        self.peer_gone = {name: threading.Event() for name in ANSWERS}
        super().__init__(self._connection)

    def _connection(self, conn: socket.socket) -> None:
        name = conn.recv(65536).split(b"/", 2)[1].decode()  # b"POST /NAME/v1/..."
        try:
            ANSWERS[name](conn)
        except OSError:
            self.peer_gone[name].set()


def content_length_body(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n" % (64 * 1024 * 1024))
    while True:  # 64 MiB promised, sent slowly: the gateway must stop reading and hang up
        conn.sendall(b"x" * 1024)
        time.sleep(0.001)


def chunked_body(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")
    while True:
        conn.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")
        time.sleep(0.001)


def long_stream(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")
    for i in range(64):
        event = b"data: %d %s\n\n" % (i, b"y" * 512)
        conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
    conn.sendall(b"0\r\n\r\n")


def slow_answer(conn: socket.socket) -> None:
    conn.settimeout(10)
    if conn.recv(1) == b"":  # the gateway hung up before the answer was ready
        raise ConnectionResetError
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")


ANSWERS: dict[str, Callable[[socket.socket], None]] = {
    f.__name__: f for f in (content_length_body, chunked_body, long_stream, slow_answer)}


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gw(upstream: Upstream, start_gateway: PolicyFactory) -> Proc:
    """A gateway with the answer limit, routing model NAME to upstream NAME: /NAME/v1; any
    other model to `listed`, which serves only m1 (and is never asked: the rest is a 404)."""
    return start_gateway("".join(
        f'[upstreams.{name}]\nurl = "http://127.0.0.1:{upstream.port}/{name}/v1"\n'
        f'cloud = false\n[[routes]]\nmatch = {{ model = "{name}" }}\nforward = ["{name}"]\n'
        for name in ANSWERS) + f'[upstreams.listed]\nurl = "http://127.0.0.1:{upstream.port}/v1"'
        '\ncloud = false\nmodels = ["m1"]\n[[routes]]\nforward = ["listed"]\n',
        env={"MYCO_GATEWAY_MAX_RESPONSE_BYTES": str(LIMIT)})


@pytest.mark.parametrize("answer", ["content_length_body", "chunked_body"])
def test_an_answer_over_the_limit_is_a_502_and_the_connection_is_closed(
        upstream: Upstream, gw: Proc, answer: str) -> None:
    response = httpx.post(gw.url + "/v1/chat/completions", json={"model": answer}, timeout=10)
    assert response.status_code == 502
    assert response.json()["error"]["message"] == (
        f"every target failed: {answer}: answer larger than {LIMIT} bytes (the limit for an "
        "answer that is not streamed)")
    assert upstream.peer_gone[answer].wait(5), "the gateway kept reading the oversized answer"


def test_a_stream_over_the_limit_passes_unbuffered(gw: Proc) -> None:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=10,
                      json={"model": "long_stream", "stream": True}) as response:
        assert response.status_code == 200
        body = b"".join(response.iter_raw())
    assert len(body) > 8 * LIMIT and body.count(b"data: ") == 64


def test_a_client_that_leaves_closes_the_pending_upstream_request(upstream: Upstream,
                                                                 gw: Proc) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/chat/completions", json={"model": "slow_answer"}, timeout=0.5)
    left = time.monotonic()
    assert upstream.peer_gone["slow_answer"].wait(5), \
        "the gateway kept waiting for an answer nobody reads"
    assert time.monotonic() - left < 2
    entry = json.loads(gw.audit_path.read_text().splitlines()[-1])  # type: ignore[attr-defined]
    assert entry["status"] == 499 and "went away" in entry["reason"]
    assert entry["attempts"] == [{"target": "slow_answer", "outcome": "abandoned"}]


def test_a_huge_model_name_is_not_echoed_nor_logged(gw: Proc) -> None:
    audit: Path = gw.audit_path  # type: ignore[attr-defined]
    model = "m" * (4 * 1024 * 1024)
    before = audit.stat().st_size if audit.exists() else 0
    response = httpx.post(gw.url + "/v1/chat/completions", json={"model": model}, timeout=30)
    assert response.status_code == 404
    assert len(response.content) < 2048, len(response.content)
    assert f"({len(model)} characters)" in response.json()["error"]["message"]
    assert audit.stat().st_size - before < 4096
    entry = json.loads(audit.read_text().splitlines()[-1])
    assert entry["model"].endswith(f"... ({len(model)} characters)")


def test_the_audit_log_is_private(tmp_path: Path, gateway_identity: Identity) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[upstreams.up]\nurl = "http://127.0.0.1:9/v1"\ncloud = false\n'
                      '[[routes]]\nforward = ["up"]\n')
    fresh, existing = tmp_path / "new" / "audit.jsonl", tmp_path / "audit.jsonl"
    existing.write_text("")
    os.chmod(existing, 0o644)  # as every earlier version created it
    gateways = [myco("gateway", "--policy", str(policy), "--port", "0", "--audit-log",
                     str(path), "--state-dir", str(Path(gateway_identity.cert_path).parent))
                for path in (fresh, existing)]
    try:
        for gw in gateways:
            httpx.post(gw.url + "/v1/chat/completions", json={"model": "m"})
    finally:
        stop_all(gateways)
    for path in (fresh, existing):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert path.read_text().count("\n") == 1

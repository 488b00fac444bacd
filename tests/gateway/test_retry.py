"""A request goes to the next eligible target whenever no byte has reached the client yet.

Two targets on one route; the first fails in a way a real one does: killed or frozen (SIGSTOP)
with six non-streaming requests in flight, accepting and closing without an answer, answering
garbage, or cutting its answer short.  Every request is answered by the second, and the audit
entry lists both attempts.  Once a stream has begun, nothing is retried: the client gets an
error event and the second target never hears of the request.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
import pytest

from myco.identity import Identity
from tests.conftest import PolicyFactory
from tests.procs import Proc, fake_upstream, wait_for, wait_for_async
from tests.rawserver import RawServer

pytestmark = pytest.mark.slow  # each case its own gateway and targets, killed or frozen


def audit(gw: Proc, n: int) -> list[dict[str, Any]]:
    lines = gw.audit_path.read_text().splitlines()  # type: ignore[attr-defined]
    return [json.loads(line) for line in lines[-n:]]


def two_nodes(a: Proc, b: Proc) -> str:
    return f"""
[nodes.a]
address = "{a.address}"
id = "{a.node_id}"
[nodes.b]
address = "{b.address}"
id = "{b.node_id}"
[[routes]]
forward = ["a", "b"]
"""


def connections(proc: Proc, to: Proc) -> int:
    """How many TCP connections `proc` has open to `to`."""
    port = int(to.address.rsplit(":", 1)[1])
    return sum(c.status == psutil.CONN_ESTABLISHED and bool(c.raddr) and c.raddr.port == port
               for c in psutil.Process(proc.popen.pid).net_connections("tcp"))


async def in_flight(url: str, n: int, body: dict[str, Any], meanwhile: Callable[[], None],
                    ready: Callable[[], bool]) -> list[httpx.Response]:
    """`n` concurrent requests; `meanwhile` runs once `ready()`, while they are pending."""
    async with httpx.AsyncClient(base_url=url, timeout=20) as client:
        jobs = [asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
                for _ in range(n)]
        await wait_for_async(ready, 5, f"{n} requests on their way")
        assert not any(job.done() for job in jobs), "answered before the fault"
        meanwhile()
        return list(await asyncio.gather(*jobs))


@pytest.fixture
def nodes(gateway_identity: Identity) -> Iterator[tuple[Proc, Proc]]:
    a = fake_upstream("a", "m", node_for=gateway_identity)
    b = fake_upstream("b", "m", node_for=gateway_identity)
    yield a, b
    for proc in (a, b):
        if proc.popen.poll() is None:
            os.kill(proc.popen.pid, signal.SIGCONT)
        proc.stop()


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP])
def test_six_in_flight_to_a_node_that_dies_or_freezes_are_answered_by_the_next(
        nodes: tuple[Proc, Proc], start_gateway: PolicyFactory, fault: int) -> None:
    a, b = nodes
    # The health watcher notices a frozen node within interval + timeout and fails what is in
    # flight to it (`Membership._lost`); a killed one closes its connections at once.
    gw = start_gateway(two_nodes(a, b), env={"MYCO_GATEWAY_HEALTH_INTERVAL": "0.2",
                                             "MYCO_GATEWAY_HEALTH_TIMEOUT": "0.3"})
    body = {"model": "m", "fake_delay": 1.0}
    started = time.monotonic()
    answers = asyncio.run(in_flight(gw.url, 6, body, lambda: os.kill(a.popen.pid, fault),
                                    ready=lambda: connections(gw, a) >= 6))
    assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
    assert {r.json()["choices"][0]["message"]["content"] for r in answers} == {"hello from b"}
    assert {r.headers["x-myco-node"] for r in answers} == {"b"}
    assert time.monotonic() - started < 5
    for entry in audit(gw, 6):
        assert entry["status"] == 200 and entry["target"] == "b"
        assert [a["target"] for a in entry["attempts"]] == ["a", "b"]
        assert not entry["attempts"][0]["outcome"].startswith("answered")
        assert entry["attempts"][1]["outcome"] == "answered 200"


def accept_and_close(conn: socket.socket) -> None:
    conn.recv(65536)


def garbage(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


def cut_short(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                 b"content-length: 100\r\n\r\n{\"choices\": [")


def reset(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


@pytest.fixture(scope="module")
def second() -> Iterator[Proc]:
    proc = fake_upstream("second", "m")
    yield proc
    proc.stop()


@pytest.mark.parametrize("fault", [accept_and_close, garbage, cut_short, reset])
def test_a_first_target_that_fails_before_answering_is_followed_by_the_next(
        second: Proc, start_gateway: PolicyFactory,
        fault: Callable[[socket.socket], None]) -> None:
    first = RawServer(fault)
    try:
        gw = start_gateway(f"""
[upstreams.first]
url = "http://127.0.0.1:{first.port}/v1"
cloud = false
[upstreams.second]
url = "{second.url}/v1"
cloud = false
[[routes]]
forward = ["first", "second"]
""")
        response = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m"}, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "hello from second"
        assert first.accepted >= 1
        entry = audit(gw, 1)[0]
        assert [a["target"] for a in entry["attempts"]] == ["first", "second"]
        assert not entry["attempts"][0]["outcome"].startswith("answered")
    finally:
        first.close()


def test_every_attempt_failing_is_a_502_listing_them(start_gateway: PolicyFactory) -> None:
    first, other = RawServer(accept_and_close), RawServer(garbage)
    try:
        gw = start_gateway(f"""
[upstreams.first]
url = "http://127.0.0.1:{first.port}/v1"
cloud = false
[upstreams.other]
url = "http://127.0.0.1:{other.port}/v1"
cloud = false
[[routes]]
forward = ["first", "other"]
""")
        response = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m"}, timeout=10)
        assert response.status_code == 502
        message = response.json()["error"]["message"]
        assert message.startswith("every target failed: first: failed before answering")
        assert "; other: failed before answering" in message
        assert len(audit(gw, 1)[0]["attempts"]) == 2
    finally:
        first.close()
        other.close()


def one_event_then_close(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")
    event = b'data: {"n": 0}\n\n'
    conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
    time.sleep(0.2)


def test_nothing_is_retried_once_a_stream_has_begun(start_gateway: PolicyFactory) -> None:
    first, canary = RawServer(one_event_then_close), RawServer(lambda conn: None)
    try:
        gw = start_gateway(f"""
[upstreams.first]
url = "http://127.0.0.1:{first.port}/v1"
cloud = false
[upstreams.canary]
url = "http://127.0.0.1:{canary.port}/v1"
cloud = false
[[routes]]
forward = ["first", "canary"]
""")
        with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=10,
                          json={"model": "m", "stream": True}) as response:
            assert response.status_code == 200
            text = b"".join(response.iter_raw()).decode()
        assert text.startswith('data: {"n": 0}')
        assert '"code":"target_failed"' in text and "mid-stream" in text
        assert canary.accepted == 0
        assert [a["target"] for a in audit(gw, 1)[0]["attempts"]] == ["first"]
    finally:
        first.close()
        canary.close()


def test_a_busy_target_is_followed_by_the_next_and_then_tried_last(
        nodes: tuple[Proc, Proc], start_gateway: PolicyFactory) -> None:
    """A 429 before the first byte is not an answer while a target is left: the next one
    answers, and the busy one goes last until its Retry-After is over (dry-run shows why)."""
    a, b = nodes
    gw = start_gateway(two_nodes(a, b))
    answer = httpx.post(gw.url + "/v1/chat/completions",
                        json={"model": "m", "fake_busy": ["a"]}, timeout=10)
    assert answer.status_code == 200 and answer.headers["x-myco-node"] == "b"
    [entry] = audit(gw, 1)
    assert [(x["target"], x["outcome"]) for x in entry["attempts"]] == [
        ("a", "busy: answered 429, retry after 30 s"), ("b", "answered 200")]
    dry = httpx.post(gw.url + "/v1/policy/dry-run", json={"model": "m", "endpoint": "chat"}).json()
    assert dry["target"] == "b"
    assert dry["candidates"][0]["load"]["backing_off"] is True
    # Every target busy: the last one's 429 reaches the client, Retry-After and all.
    both = httpx.post(gw.url + "/v1/chat/completions",
                      json={"model": "m", "fake_busy": ["a", "b"]}, timeout=10)
    assert both.status_code == 429 and both.headers["retry-after"] == "30"


@pytest.mark.parametrize("balance", ["first", "least-busy"])
def test_least_busy_spreads_requests_in_flight_over_both_targets(
        nodes: tuple[Proc, Proc], start_gateway: PolicyFactory, balance: str) -> None:
    a, b = nodes
    gw = start_gateway(two_nodes(a, b) + f'balance = "{balance}"\n')
    answers = asyncio.run(in_flight(gw.url, 6, {"model": "m", "fake_delay": 0.5},
                                    lambda: None, ready=lambda: True))
    served = sorted(r.headers["x-myco-node"] for r in answers)
    # The fakes report no slots: "first" never sees them full and keeps to the order written.
    assert served == (sorted(["a", "b"] * 3) if balance == "least-busy" else ["a"] * 6), served


def test_a_request_abandoned_before_its_answer_is_no_longer_counted_in_flight(
        nodes: tuple[Proc, Proc], start_gateway: PolicyFactory) -> None:
    a, b = nodes
    gw = start_gateway(two_nodes(a, b))
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while a is still answering
        httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", "fake_delay": 3},
                   timeout=0.5)

    def load() -> dict[str, Any]:
        dry = httpx.post(gw.url + "/v1/policy/dry-run", json={"model": "m"}).json()
        return dict(dry["candidates"][0]["load"])

    wait_for(lambda: load()["busy"] == 0, 5, load)

"""Streams are relayed as they arrive, and a client that hangs up closes the upstream stream."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import PolicyFactory
from tests.procs import Proc, wait_for
from tests.rawserver import RawServer


class SlowStream(RawServer):
    """An upstream that sends an SSE event every `pause` seconds, 50 of them unless its peer
    leaves; `sending`: the streams it is sending now."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.sending: set[socket.socket] = set()
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket) -> None:
        conn.recv(65536)
        self.sending.add(conn)
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for i in range(50):
                data = b"data: {\"n\": %d}\n\n" % i
                conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))
                time.sleep(self.pause)
            conn.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        finally:
            self.sending.discard(conn)


@pytest.fixture
def slow() -> Iterator[SlowStream]:
    server = SlowStream(pause=0.5)
    yield server
    server.close()


@pytest.fixture
def gw(slow: SlowStream, start_gateway: PolicyFactory) -> Proc:
    return start_gateway(f"""
[upstreams.slow]
url = "http://127.0.0.1:{slow.port}/v1"
cloud = false
[[routes]]
match = {{ model = "*" }}
forward = ["slow"]
""")


def test_the_first_event_comes_at_once_and_hanging_up_closes_the_upstream_stream(
        gw: Proc, slow: SlowStream) -> None:
    started = time.monotonic()
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=10,
                      json={"model": "m", "stream": True}) as response:
        assert response.headers["x-myco-node"] == "slow"
        first = next(response.iter_raw())
        elapsed = time.monotonic() - started
        assert len(slow.sending) == 1
    assert first.startswith(b'data: {"n": 0}')
    assert elapsed < 0.4, f"first event took {elapsed:.2f} s: the relay buffered"
    # The upstream notices within a couple of its sends that nobody is reading any more.
    wait_for(lambda: not slow.sending, 5, "the gateway closed the upstream stream")

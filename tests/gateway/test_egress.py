"""The egress guard: only listed host:port pairs are ever connected to.

A canary server counts every connection it accepts; it must see none, whatever spelling of its
address a request uses, and also when a listed upstream redirects there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest

from gateway.egress import Egress, EgressDenied
from gateway.pool import ConnectionPool, Peer
from tests.conftest import PolicyFactory
from tests.procs import Proc, fake_upstream
from tests.rawserver import RawServer


@pytest.fixture
def canary() -> Iterator[RawServer]:
    server = RawServer(lambda conn: None)  # counts connections, answers nothing
    yield server
    server.close()


@pytest.fixture(scope="module")
def listed() -> Iterator[Proc]:
    proc = fake_upstream("listed", "m1")
    yield proc
    proc.stop()


def pool_for(egress: Egress) -> ConnectionPool:
    """The gateway's one way out (forwarding and health checks), as the gateway builds it."""
    return ConnectionPool(egress, connect_timeout=5, read_timeout=5)


SPELLINGS = ["127.0.0.1", "localhost", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "127.1",
             "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"]


@pytest.mark.parametrize("host", SPELLINGS)
def test_unlisted_port_is_refused_before_connecting(canary: RawServer, listed: Proc,
                                                    host: str) -> None:
    listed_port = int(listed.address.split(":")[1])

    async def go() -> None:
        pool = pool_for(Egress([("127.0.0.1", listed_port)]))
        try:
            with pytest.raises(EgressDenied, match="not listed in the policy"):
                await pool.call(Peer("http", host, canary.port, ""), "/v1/models", 5)
            # The same spelling of the listed endpoint goes through.
            ok, _ = await pool.call(Peer("http", host, listed_port, ""), "/v1/models", 5)
            assert ok == 200
        finally:
            await pool.aclose()

    asyncio.run(go())
    assert canary.accepted == 0


def test_listed_host_on_another_port_is_refused(canary: RawServer) -> None:
    async def go() -> None:
        pool = pool_for(Egress([("127.0.0.1", canary.port + 1)]))
        with pytest.raises(EgressDenied):
            await pool.call(Peer("http", "127.0.0.1", canary.port, ""), "/", 5)
        await pool.aclose()

    asyncio.run(go())
    assert canary.accepted == 0


def test_gateway_does_not_follow_a_redirect_off_the_list(canary: RawServer,
                                                         start_gateway: PolicyFactory) -> None:
    import uvicorn

    from bench.fake_upstream import make_app
    from myco.serve import bind

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(
        make_app("redirector", redirect_to=f"http://127.0.0.1:{canary.port}/v1/chat/completions"),
        log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        gw = start_gateway(f"""
[upstreams.redirector]
url = "http://127.0.0.1:{port}/v1"
cloud = false
[[routes]]
match = {{ model = "*" }}
forward = ["redirector"]
""")
        response = httpx.post(gw.url + "/v1/chat/completions", json={"model": "x"})
        assert response.status_code == 502
        assert "redirects are not followed" in response.json()["error"]["message"]
        assert response.headers["x-myco-rule"] == "routes[0]"
    finally:
        server.should_exit = True
        thread.join(5)
    assert canary.accepted == 0

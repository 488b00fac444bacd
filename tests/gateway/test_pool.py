"""The forwarding pool against raw socket servers: reuse, stale connections, streaming, faults."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from gateway.egress import Egress, EgressDenied
from gateway.pool import ConnectionPool, Peer
from tests.rawserver import RawServer

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


Reply = Callable[[socket.socket, int], object]  # (connection, request number) -> keep going?


def per_request(reply: Reply) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        n = 0
        while conn.recv(65536):
            n += 1
            if not reply(conn, n):
                return

    return handle


@pytest.fixture
def serve() -> Iterator[Callable[[Reply], RawServer]]:
    servers: list[RawServer] = []

    def start(reply: Reply) -> RawServer:
        servers.append(RawServer(per_request(reply)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def run(server: RawServer, *bodies: bytes, read_timeout: float = 5) -> list[bytes]:
    async def go() -> list[bytes]:
        pool = ConnectionPool(Egress([("127.0.0.1", server.port)]), connect_timeout=2,
                            read_timeout=read_timeout)
        endpoint = Peer.from_url(f"http://127.0.0.1:{server.port}/v1")
        out = []
        try:
            for body in bodies:
                response = await pool.send(endpoint, "/chat/completions", {}, body)
                out.append(await response.aread())
                await response.aclose()
        finally:
            await pool.aclose()
        return out

    return asyncio.run(go())


def test_keep_alive_connections_are_reused(serve: Callable[[Reply], RawServer]) -> None:
    server = serve(lambda conn, n: conn.sendall(OK) or True)
    assert run(server, b"1", b"2", b"3") == [b"{}"] * 3
    assert server.accepted == 1


def test_connection_close_is_honoured(serve: Callable[[Reply], RawServer]) -> None:
    close = OK.replace(b"content-length", b"connection: close\r\ncontent-length")
    server = serve(lambda conn, n: conn.sendall(close) and False)
    assert run(server, b"1", b"2") == [b"{}"] * 2
    assert server.accepted == 2


def test_a_stale_idle_connection_is_retried_once_on_a_new_one(
        serve: Callable[[Reply], RawServer]) -> None:
    # Answers the first request on each connection, then hangs up on the next one unanswered.
    server = serve(lambda conn, n: n == 1 and (conn.sendall(OK) or True))
    assert run(server, b"1", b"2") == [b"{}"] * 2
    assert server.accepted == 2


def test_chunked_body_streams_in_pieces(serve: Callable[[Reply], RawServer]) -> None:
    def reply(conn: socket.socket, n: int) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        for i in range(3):
            data = b"data: %d\n\n" % i
            conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            time.sleep(0.05)
        conn.sendall(b"0\r\n\r\n")
        return True

    server = serve(reply)

    async def go() -> list[bytes]:
        pool = ConnectionPool(Egress([("127.0.0.1", server.port)]), connect_timeout=2,
                            read_timeout=5)
        response = await pool.send(Peer.from_url(f"http://127.0.0.1:{server.port}"),
                                   "/x", {}, b"{}")
        chunks = [chunk async for chunk in response.aiter_raw()]
        await response.aclose()
        await pool.aclose()
        return chunks

    assert asyncio.run(go()) == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]


def test_silence_is_a_read_timeout_not_a_hang(serve: Callable[[Reply], RawServer]) -> None:
    server = serve(lambda conn, n: time.sleep(2) or False)
    with pytest.raises(httpx.ReadTimeout):
        run(server, b"1", read_timeout=0.2)


def test_mid_response_hangup_is_a_protocol_error(serve: Callable[[Reply], RawServer]) -> None:
    server = serve(lambda conn, n: conn.sendall(OK[:-1].replace(b"2\r\n", b"20\r\n")) and False)
    with pytest.raises(httpx.RemoteProtocolError):
        run(server, b"1")


def test_unlisted_endpoint_never_connects(serve: Callable[[Reply], RawServer]) -> None:
    server = serve(lambda conn, n: conn.sendall(OK) or True)

    async def go() -> None:
        pool = ConnectionPool(Egress([("127.0.0.1", server.port + 1)]), connect_timeout=2,
                            read_timeout=2)
        with pytest.raises(EgressDenied):
            await pool.send(Peer.from_url(f"http://127.0.0.1:{server.port}"), "/", {}, b"")

    asyncio.run(go())
    assert server.accepted == 0

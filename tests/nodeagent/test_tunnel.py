"""The RPC tunnel with real sockets on 127.0.0.1 and real identities: entrance -> exit -> a
target standing in for llama.cpp's rpc server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from myco.identity import Identity, load_or_create
from myco.tls import client_context
from nodeagent.lending.tunnel import TunnelEntrance, TunnelExit
from tests.procs import wait_for_async

pytestmark = pytest.mark.timeout(60)
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    root = tmp_path_factory.mktemp("ids")
    return {name: load_or_create(root / name, name) for name in ("head", "worker", "stranger")}


def pem(identity: Identity) -> str:
    return Path(identity.cert_path).read_text()


class Target:
    """Echoes what it reads (or hangs up after the first read, or reads nothing until
    `release` is set); counts connections and ends."""

    def __init__(self, *, hang_up: bool = False, stall: bool = False) -> None:
        self.hang_up = hang_up
        self.release = asyncio.Event()
        if not stall:
            self.release.set()
        self.connections = self.ends = self.received = 0
        self.tasks: set[asyncio.Task[object]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        try:
            await self.release.wait()
            while data := await reader.read(1 << 20):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
                if self.hang_up:
                    break
        except ConnectionResetError:
            pass
        finally:
            self.ends += 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self.tasks.discard(task)

    async def close(self) -> None:
        self.server.close()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 5)
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def tunnel(ids: dict[str, Identity], *, client: str = "head", pin: str = "worker",
                 hang_up: bool = False, stall: bool = False, timeout: float = 2,
                 ) -> AsyncIterator[tuple[TunnelEntrance, TunnelExit, Target]]:
    """Target, exit (worker, granting head) and entrance (as `client`, pinned to `pin`)."""
    target = Target(hang_up=hang_up, stall=stall)
    target_port = await target.start()
    exit_ = TunnelExit(ids["worker"], timeout=timeout)
    await exit_.start("127.0.0.1")
    exit_.grant(ids["head"].id, pem(ids["head"]), target_port)
    entrance = TunnelEntrance(ids[client], "127.0.0.1", exit_.port, ids[pin].id, timeout=timeout)
    await entrance.start()
    try:
        yield entrance, exit_, target
    finally:
        await entrance.close()
        await exit_.close()
        await target.close()
    # Nothing of the tunnel's may outlive it.
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def dial(port: int) -> Streams:
    return await asyncio.open_connection("127.0.0.1", port)


async def hung_up(conn: Streams) -> bool:
    """Whether the other end closed the connection without relaying a byte back."""
    try:
        data = await asyncio.wait_for(conn[0].read(), 5)
    finally:
        conn[1].close()
    return data == b""


def test_bytes_flow_both_ways(ids: dict[str, Identity], caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with tunnel(ids) as (entrance, _, target):
            reader, writer = await dial(entrance.port)
            for message in (b"x", os.urandom(64), os.urandom(300_000)):
                writer.write(message)
                assert await reader.readexactly(len(message)) == message
            writer.close()
            await wait_for_async(lambda: target.ends == 1, 5, "the target's end closed")
            assert target.connections == 1

    with caplog.at_level(logging.INFO, "myco.node.tunnel"):
        asyncio.run(go())
    assert "tunnel exit: opened " + ids["head"].id in caplog.text
    assert "tunnel entrance: closed" in caplog.text


def test_a_client_the_exit_does_not_trust_gets_nothing_relayed(
        ids: dict[str, Identity], caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with tunnel(ids, client="stranger") as (entrance, _, target):
            conn = await dial(entrance.port)
            conn[1].write(b"hello")
            assert await hung_up(conn)
            assert target.connections == 0

    asyncio.run(go())
    assert "tunnel exit: refused" in caplog.text


def test_an_exit_with_another_id_than_the_pinned_one_gets_nothing(
        ids: dict[str, Identity], caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with tunnel(ids, pin="stranger") as (entrance, _, target):
            conn = await dial(entrance.port)
            conn[1].write(b"hello")
            assert await hung_up(conn)
            assert target.connections == 0

    asyncio.run(go())
    assert "identity mismatch: expected " + ids["stranger"].id in caplog.text


def test_an_unreachable_exit_closes_the_local_connection_at_once(
        ids: dict[str, Identity]) -> None:
    async def go() -> None:
        with socket.socket() as free:  # a port with nothing listening
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        async with TunnelEntrance(ids["head"], "127.0.0.1", port, ids["worker"].id) as entrance:
            await entrance.start()
            assert await hung_up(await dial(entrance.port))

    asyncio.run(go())


def test_revoke_ends_open_connections_and_refuses_new_ones(
        ids: dict[str, Identity], caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with tunnel(ids) as (entrance, exit_, target):
            open_ = await dial(entrance.port)
            open_[1].write(b"ping")
            assert await open_[0].readexactly(4) == b"ping"
            exit_.revoke(ids["head"].id)
            assert await hung_up(open_)
            await wait_for_async(lambda: target.ends == 1, 5, "the target's end closed")
            later = await dial(entrance.port)
            later[1].write(b"ping")
            assert await hung_up(later)
            assert target.connections == 1
            # Refused in the handshake already: the certificate is no longer a trust anchor.
            assert "certificate verify failed" in caplog.text
            # Granting again works: the revoked certificate may come back.
            exit_.grant(ids["head"].id, pem(ids["head"]), target.server.sockets[0].getsockname()[1])
            again = await dial(entrance.port)
            again[1].write(b"pong")
            assert await again[0].readexactly(4) == b"pong"
            again[1].close()

    asyncio.run(go())


def test_grant_refuses_a_certificate_of_another_id(ids: dict[str, Identity]) -> None:
    exit_ = TunnelExit(ids["worker"])
    with pytest.raises(ValueError, match="the certificate is " + ids["stranger"].id):
        exit_.grant(ids["head"].id, pem(ids["stranger"]), 1234)


def test_a_large_transfer_arrives_intact(ids: dict[str, Identity]) -> None:
    payload = os.urandom(16 * 1024 * 1024)  # 64 relay chunks, far over the socket buffers

    async def go() -> bytes:
        async with tunnel(ids) as (entrance, _, _target):
            reader, writer = await dial(entrance.port)

            async def send() -> None:
                for i in range(0, len(payload), 1 << 20):
                    writer.write(payload[i:i + (1 << 20)])
                    await writer.drain()

            sending = asyncio.create_task(send())
            echoed = await reader.readexactly(len(payload))
            await sending
            writer.close()
            return echoed

    echoed = asyncio.run(go())
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


async def fill(writer: asyncio.StreamWriter, limit: int = 400 << 20) -> int:
    """Send until the connection stops taking bytes for 0.5 s; the bytes sent."""
    sent, chunk = 0, b"w" * (1 << 20)
    with contextlib.suppress(TimeoutError):
        while sent < limit:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 0.5)
            sent += len(chunk)
    return sent


def test_a_target_that_does_not_read_holds_the_sender_back(ids: dict[str, Identity]) -> None:
    async def go() -> int:
        async with tunnel(ids, stall=True) as (entrance, _, target):
            _, writer = await dial(entrance.port)
            sent = await fill(writer)
            target.release.set()
            writer.close()
            return sent

    # What the kernel's buffers hold on three hops, not all of it.
    assert asyncio.run(go()) < 100 * (1 << 20)


def test_closing_does_not_wait_for_a_target_that_stopped_reading(
        ids: dict[str, Identity]) -> None:
    async def go() -> None:
        async with tunnel(ids, stall=True, timeout=0.5) as (entrance, exit_, target):
            target_port = target.server.sockets[0].getsockname()[1]
            _, writer = await dial(entrance.port)
            await fill(writer)
            async with asyncio.timeout(2):
                await exit_.close()
            assert not [c for c in psutil.Process().net_connections("tcp")
                        if c.raddr and c.raddr.port == target_port]
            target.release.set()
            writer.close()

    asyncio.run(go())


def test_the_client_closing_closes_the_target(ids: dict[str, Identity]) -> None:
    async def go() -> None:
        async with tunnel(ids) as (entrance, _, target):
            reader, writer = await dial(entrance.port)
            writer.write(b"a" * 100_000)
            writer.write_eof()  # a half-close ends the relay too, after what was sent
            await wait_for_async(lambda: target.ends == 1, 5, "the target's end closed")
            assert target.received == 100_000
            await asyncio.wait_for(reader.read(), 5)  # and the client is closed
            writer.close()

    asyncio.run(go())


def test_the_target_closing_closes_the_client(ids: dict[str, Identity]) -> None:
    async def go() -> None:
        async with tunnel(ids, hang_up=True) as (entrance, _, target):
            reader, writer = await dial(entrance.port)
            writer.write(b"last words")
            assert await asyncio.wait_for(reader.read(), 5) == b"last words"
            writer.close()
            assert target.ends == 1

    asyncio.run(go())


def test_closing_the_tunnel_ends_its_connections(ids: dict[str, Identity]) -> None:
    async def go() -> None:
        async with tunnel(ids) as (entrance, exit_, target):
            conn = await dial(entrance.port)
            conn[1].write(b"ping")
            assert await conn[0].readexactly(4) == b"ping"
            await exit_.close()
            assert await hung_up(conn)
            await wait_for_async(lambda: target.ends == 1, 5, "the target's end closed")

    asyncio.run(go())


def test_a_peer_revoked_during_its_handshake_is_refused_after_it(
        ids: dict[str, Identity], caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with tunnel(ids) as (_, exit_, target):
            reader, writer = await dial(exit_.port)  # the exit starts its handshake now...
            await wait_for_async(lambda: exit_._tasks, 5, "the exit accepted")
            exit_.revoke(ids["head"].id)  # ...with the context that still trusts head
            await writer.start_tls(client_context(ids["head"]))
            writer.write(b"ping")
            assert await hung_up((reader, writer))
            assert target.connections == 0

    asyncio.run(go())
    assert f"refused {ids['head'].id} at 127.0.0.1:" in caplog.text
    assert "not granted" in caplog.text

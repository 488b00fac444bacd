"""Tunnel: llama.cpp RPC between hosts, carried over mutual TLS pinned to ids.

ggml's RPC server has no authentication, so it listens on 127.0.0.1 only.  A head reaches a
worker on another host through this tunnel and nothing else:

    head's llama.cpp -> 127.0.0.1:L  TunnelEntrance  ==mTLS==>  TunnelExit (LAN) -> 127.0.0.1:W

- `TunnelEntrance` listens on 127.0.0.1; per connection it dials the exit as its identity and
  checks the exit's id against the pinned worker id before it relays a byte.
- `TunnelExit` listens on the LAN and requires a client certificate.  `grant` adds a trusted
  peer and the one local port it may reach (or how to dial it: nodeagent/lending/lender.py dials a
  worker in its own network); `revoke` removes it and ends its connections.
  OpenSSL refuses unknown certificates in the handshake; the allow-set is checked again after
  it, so a peer revoked while its handshake was running is still refused.  The worker is
  dialled only when the peer's first bytes arrive (RPC's client speaks first).

Errors: nothing is raised to the caller once listening.  A failed handshake, pin, grant or
dial closes that connection at once (llama.cpp fails fast instead of hanging) and is logged;
each connection logs one line when it is refused or closed, and one when it is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Self

from myco import tls
from myco.identity import Identity

log = logging.getLogger("myco.node.tunnel")
CHUNK = 256 * 1024
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Dial = Callable[[], Awaitable[Stream]]


class Refused(Exception):
    """A connection the tunnel will not relay (not granted, closed before speaking)."""


def _nodelay(writer: asyncio.StreamWriter) -> None:
    # RPC waits for one round trip per graph compute: never hold back a small write.
    # (asyncio's selector loop sets this too; the tunnel must not depend on that.)
    if (sock := writer.get_extra_info("socket")) is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _close(timeout: float, *writers: asyncio.StreamWriter) -> None:
    """Close gracefully (flush, TLS close_notify) within `timeout`, then abort what is left,
    also when cancelled: a close cut short would leave the socket open for good."""
    try:
        for writer in writers:
            writer.close()
        closing = asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing, timeout)
    finally:
        for writer in writers:
            writer.transport.abort()  # a no-op once closed


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                counts: list[int], i: int) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
            counts[i] += len(data)


async def relay(a: Stream, b: Stream, timeout: float, counts: list[int]) -> None:
    """Copy bytes both ways until either side ends or fails, then close both.
    Adds the bytes copied a -> b to counts[0] and b -> a to counts[1] as they go.  A half-close
    ends the relay: RPC never half-closes, and a peer that stopped sending is gone."""
    pumps = {asyncio.create_task(_pump(a[0], b[1], counts, 0)),
             asyncio.create_task(_pump(b[0], a[1], counts, 1))}
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await _close(timeout, a[1], b[1])
        await asyncio.gather(*pumps, return_exceptions=True)


def _why(exc: BaseException) -> str:
    # ssl.SSLError("text") prints as a tuple; a bare TimeoutError prints as nothing.
    return str(exc.args[0]) if len(exc.args) == 1 else str(exc) or type(exc).__name__


class _Listener:
    """A listening socket whose connection handlers end when `close` is called."""

    def __init__(self, name: str, timeout: float) -> None:
        self.name, self.timeout = name, timeout
        self._server: asyncio.Server | None = None
        self._tasks: dict[asyncio.Task[Any], str | None] = {}  # handler -> peer id

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not listening; call start() first")
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks[task] = None
        _nodelay(writer)
        # revoke() or close() cancels it; the relay closed both sides.  Python 3.11's
        # start_server logs an error for a handler task that ends cancelled.
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._handle(task, reader, writer)
        finally:
            del self._tasks[task]

    async def _handle(self, task: asyncio.Task[Any], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _relay(self, who: str, a: Stream, b: Stream, counts: list[int]) -> None:
        log.info("%s: opened %s", self.name, who)
        started = time.monotonic()
        try:
            await relay(a, b, self.timeout, counts)
        finally:
            log.info("%s: closed %s after %.1f s (%d bytes forth, %d back)", self.name, who,
                     time.monotonic() - started, *counts)

    def connections(self, peer: str) -> int:
        """How many connections of `peer` are open (from its handshake on)."""
        return list(self._tasks.values()).count(peer)

    def _end(self, peer: str | None = None) -> None:
        for task in [t for t, found in self._tasks.items() if peer is None or found == peer]:
            task.cancel()

    async def close(self) -> None:
        """Stop listening and end every connection."""
        if self._server is not None:
            self._server.close()
            while self._tasks:  # a connection accepted just before close() may start late
                self._end()
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


class TunnelExit(_Listener):
    """Accepts mutual-TLS connections from granted peers; relays each to its 127.0.0.1 port."""

    def __init__(self, identity: Identity, *, timeout: float = 10.0) -> None:
        super().__init__("tunnel exit", timeout)
        self.identity = identity
        self._grants: dict[str, tuple[str, int | Dial]] = {}  # peer id -> (certificate, target)
        self._context = tls.server_context(identity, ())

    async def start(self, host: str, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, host, port)
        return self.port

    def grant(self, peer_id: str, peer_cert_pem: str, target: int | Dial) -> None:
        """Let `peer_id` reach 127.0.0.1:`target`, or what `target()` connects to (replacing a
        previous grant).  ValueError unless the certificate is exactly one, and `peer_id`'s."""
        if (found := tls.certificate_id(peer_cert_pem)) != peer_id:
            raise ValueError(f"the certificate is {found}, not {peer_id}")
        tls.trust(self._context, peer_cert_pem)  # OpenSSL can only add
        self._grants[peer_id] = (peer_cert_pem, target)

    def revoke(self, peer_id: str) -> None:
        """Refuse `peer_id` from now on and end its open connections."""
        if self._grants.pop(peer_id, None) is not None:
            # A fresh context drops its certificate from the handshake's trust anchors too.
            pems = [pem for pem, _ in self._grants.values()]
            self._context = tls.server_context(self.identity, pems)
        self._end(peer_id)

    async def _handle(self, task: asyncio.Task[Any], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        who = f"{host}:{port}"
        try:
            await writer.start_tls(self._context, ssl_handshake_timeout=self.timeout)
            peer = tls.peer_id(writer.get_extra_info("ssl_object"))
            who = f"{peer} at {host}:{port}"
            if peer is None or peer not in self._grants:
                raise Refused("not granted")
            self._tasks[task] = peer
            target = self._grants[peer][1]
            if not (first := await reader.read(CHUNK)):
                raise Refused("closed before sending anything")
            dial = asyncio.open_connection("127.0.0.1", target) if isinstance(target, int) \
                else target()
            worker = await asyncio.wait_for(dial, self.timeout)
        except (OSError, Refused) as exc:
            log.warning("tunnel exit: refused %s: %s", who, _why(exc))
            await _close(self.timeout, writer)
            return
        _nodelay(worker[1])
        worker[1].write(first)
        where = f"127.0.0.1:{target}" if isinstance(target, int) else "its worker"
        await self._relay(f"{who} -> {where}", (reader, writer), worker, [len(first), 0])


class TunnelEntrance(_Listener):
    """Listens on 127.0.0.1; relays each connection to a pinned tunnel exit over mutual TLS."""

    def __init__(self, identity: Identity, remote_host: str, remote_port: int, remote_id: str,
                 *, timeout: float = 10.0) -> None:
        super().__init__("tunnel entrance", timeout)
        self.remote, self.remote_id = (remote_host, remote_port), remote_id
        self._context = tls.client_context(identity)

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        return self.port

    async def _handle(self, task: asyncio.Task[Any], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        where = f"{self.remote[0]}:{self.remote[1]}"
        try:
            exit_ = await asyncio.wait_for(asyncio.open_connection(
                *self.remote, ssl=self._context, ssl_handshake_timeout=self.timeout), self.timeout)
        except OSError as exc:
            log.warning("tunnel entrance: refused, %s unreachable: %s", where, _why(exc))
            await _close(self.timeout, writer)
            return
        try:
            tls.check_peer(exit_[1].get_extra_info("ssl_object"), self.remote_id)
        except tls.IdentityMismatch as exc:
            log.warning("tunnel entrance: refused, %s: %s", where, _why(exc))
            await _close(self.timeout, writer, exit_[1])
            return
        _nodelay(exit_[1])
        await self._relay(f"127.0.0.1:{self.port} -> {self.remote_id} at {where}",
                          (reader, writer), exit_, [0, 0])

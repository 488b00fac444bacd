"""Forwarding connections: an HTTP/1.1 keep-alive pool on asyncio protocols.

Why not httpx here: through httpx (client and httpcore pool) one forwarded request cost about
0.5 ms of the gateway's CPU and degraded with concurrency (550 req/s at 16 connections against
a fake upstream that serves 9,000), which alone broke the overhead budget; see
bench/gateway_overhead.py.  This pool parses with httptools (the C parser uvicorn uses), keeps
idle connections per peer (LIFO), and streams body chunks as they arrive, with flow
control.  Health checks to nodes go through it too.  Its exception types are httpx's, so
callers handle one set of errors.  Every new connection asks `Egress` first: no socket is opened
to anything the policy does not list.

Nodes are reached over mutual TLS (myco/tls.py): the pool presents the gateway's certificate,
and before the first byte of a request it checks that the node's certificate has the id the
policy pins (`WrongPeer` otherwise).  A node that does not know the gateway refuses it during
the handshake (`NotPaired`): node links are TLS 1.2, where the server checks the client's
certificate before the handshake completes, so a refusal is known before a request is sent
(with 1.3 it would surface as a closed connection after the request, indistinguishable from a
crash; asyncio servers send no alert either way).  Both are `httpx.ConnectError`s: nothing
was processed, so the caller may try another target.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httptools
import httpx

from gateway.egress import Egress
from myco.tls import IdentityMismatch, check_peer

_HIGH_WATER = 64  # buffered body chunks before we stop reading from the socket
_MAX_HEADER_BYTES = 64 * 1024  # a response's header section; beyond it the response fails


class WrongPeer(httpx.ConnectError):
    """The node's certificate is not the one its id pins."""


class NotPaired(httpx.ConnectError):
    """The node refused our certificate: it is not paired with this gateway."""


class Peer(NamedTuple):
    """Where and how to connect: a listed upstream's URL, or a node's address and pinned id."""

    scheme: str
    host: str
    port: int
    base_path: str  # e.g. "/v1"
    node: bool = False  # mutual TLS as the gateway, the peer checked against `pin`
    pin: str = ""  # the id a node must present (every node is pinned; see for_node)

    @classmethod
    def from_url(cls, url: str) -> Peer:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname or "", port, parts.path.rstrip("/"))

    @classmethod
    def for_node(cls, address: str, pin: str, base_path: str = "/v1") -> Peer:
        host, _, port = address.rpartition(":")
        return cls("https", host.strip("[]"), int(port), base_path, True, pin)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reset()

    def reset(self) -> None:
        self.status = self.header_bytes = 0
        self.headers: dict[str, str] = {}
        self.got_response = self.complete = self.keep_alive = self.paused = False
        self.headers_done, self.readable = asyncio.Event(), asyncio.Event()
        self.chunks: deque[bytes] = deque()
        self.error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_response = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response: {exc}"))
        if len(self.chunks) > _HIGH_WATER and not self.paused:
            self.transport.pause_reading()
            self.paused = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(httpx.RemoteProtocolError("the server closed the connection mid-response"))

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.headers_done.set()
        self.readable.set()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > _MAX_HEADER_BYTES:
            self._fail(httpx.RemoteProtocolError("response headers larger than "
                                                 f"{_MAX_HEADER_BYTES} bytes"))
            self.close()
            return
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        # A repeated field is combined into one line, in order (RFC 9110, 5.3), not dropped.
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # False once the message is complete
        self.headers_done.set()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.readable.set()

    def on_message_complete(self) -> None:
        self.complete = True
        self.readable.set()

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class PooledResponse:
    """The part of httpx.Response's interface the relay uses."""

    def __init__(self, pool: ConnectionPool, peer: Peer, conn: _Connection,
                 read_timeout: float | None) -> None:
        self.status_code, self.headers = conn.status, conn.headers
        self._pool, self._peer, self._conn = pool, peer, conn
        self._timeout, self._released = read_timeout, False

    @property
    def is_redirect(self) -> bool:
        return 300 <= self.status_code < 400 and "location" in self.headers

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            while conn.chunks:
                yield conn.chunks.popleft()
            if conn.paused:
                conn.paused = False
                conn.transport.resume_reading()
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return
            conn.readable.clear()
            try:
                await asyncio.wait_for(conn.readable.wait(), self._timeout)
            except TimeoutError:
                raise httpx.ReadTimeout("timed out reading the response body") from None

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._peer, self._conn)


class ConnectionPool:
    def __init__(self, egress: Egress, *, connect_timeout: float, read_timeout: float,
                 node_tls: ssl.SSLContext | None = None, node_id: str = "GATEWAY_ID",
                 max_idle_per_peer: int = 64) -> None:
        self._egress, self._max_idle = egress, max_idle_per_peer
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._node_tls = node_tls  # myco.tls.client_context(the gateway's identity)
        self._node_id = node_id  # that identity's id, for error messages
        self._idle: dict[Peer, list[_Connection]] = {}
        self._busy: dict[tuple[str, int], set[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    def _context(self, peer: Peer) -> ssl.SSLContext | None:
        if peer.node:
            if self._node_tls is None:
                raise httpx.ConnectError("no gateway identity to reach nodes with")
            return self._node_tls
        if peer.scheme == "https":
            self._ssl = self._ssl or ssl.create_default_context()
            return self._ssl
        return None

    async def _connect(self, peer: Peer, timeout: float) -> _Connection:
        address = await self._egress.address_for(peer.host, peer.port)
        context = self._context(peer)
        where = f"{peer.host}:{peer.port}"
        try:
            transport, conn = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                _Connection, address, peer.port, ssl=context,
                server_hostname=peer.host if context else None), timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"timed out connecting to {where}") from None
        except (ssl.SSLError, ConnectionResetError) as exc:
            if peer.node:  # connected, then the handshake was cut off
                raise NotPaired(f"{where} refused this gateway's certificate in the TLS "
                                "handshake: pair them on the node with "
                                f"`myco node allow {self._node_id}`") from None
            raise httpx.ConnectError(f"TLS with {where} failed: {exc}") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {where}: {exc.strerror or exc}") \
                from None
        if peer.node:
            try:
                check_peer(transport.get_extra_info("ssl_object"), peer.pin)
            except IdentityMismatch as exc:
                conn.close()
                raise WrongPeer(f"{where}: {exc}") from None
        return conn

    def release(self, peer: Peer, conn: _Connection) -> None:
        self._busy.get((peer.host, peer.port), set()).discard(conn)
        idle = self._idle.setdefault(peer, [])
        if conn.reusable() and len(idle) < self._max_idle:
            conn.reset()
            idle.append(conn)
        else:
            conn.close()

    def abort(self, host: str, port: int, reason: str) -> int:
        """Fail every request in flight to host:port (its node is gone); how many there were."""
        busy = self._busy.pop((host, port), set())
        for conn in busy:
            conn._fail(httpx.ReadError(reason))
            conn.close()
        return len(busy)

    async def send(self, peer: Peer, path: str, headers: dict[str, str],
                   body: bytes, *, method: str = "POST",
                   timeout: float | None = None) -> PooledResponse:
        """Send `body` to `peer` + `path`; the response body is read by the caller.
        `timeout` (seconds) replaces the pool's connect and read timeouts for this request."""
        lines = [f"{method} {peer.base_path}{path} HTTP/1.1", f"host: {peer.host}:{peer.port}",
                 f"content-length: {len(body)}", *[f"{k}: {v}" for k, v in headers.items()]]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        idle = self._idle.get(peer)
        conn: _Connection | None = None
        while idle and (conn := idle.pop()).closed:
            conn = None
        read_timeout = self._read_timeout if timeout is None else timeout
        if conn is not None:
            try:
                return await self._exchange(peer, conn, request, read_timeout)
            except httpx.RemoteProtocolError:
                if conn.got_response:
                    raise
                # The server had closed this idle connection before reading our request:
                # nothing was processed, so sending it again on a new connection is safe.
        connect_timeout = min(self._connect_timeout, timeout or self._connect_timeout)
        conn = await self._connect(peer, connect_timeout)
        return await self._exchange(peer, conn, request, read_timeout)

    async def _exchange(self, peer: Peer, conn: _Connection, request: bytes,
                        read_timeout: float) -> PooledResponse:
        busy = self._busy.setdefault((peer.host, peer.port), set())
        busy.add(conn)
        conn.transport.write(request)
        try:
            await asyncio.wait_for(conn.headers_done.wait(), read_timeout)
        except TimeoutError:
            conn.error = httpx.ReadTimeout("timed out waiting for the response headers")
        except asyncio.CancelledError:
            conn.error = httpx.ReadError("cancelled")
            busy.discard(conn)
            conn.close()
            raise
        if conn.error is not None:
            busy.discard(conn)
            conn.close()
            raise conn.error
        return PooledResponse(self, peer, conn, read_timeout)

    async def call(self, peer: Peer, path: str, timeout: float,
                   body: bytes | None = None) -> tuple[int, bytes]:
        """GET `path` (from the peer's root), or POST a JSON `body` there, within `timeout`
        seconds: the status and the whole answer."""
        method, headers = ("GET", {}) if body is None else \
            ("POST", {"content-type": "application/json"})
        async with asyncio.timeout(timeout):
            response = await self.send(peer._replace(base_path=""), path, headers,
                                       body or b"", method=method, timeout=timeout)
            try:
                return response.status_code, await response.aread()
            finally:
                await response.aclose()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

"""Forwarding connections: an HTTP/1.1 keep-alive pool on asyncio protocols.

Why not httpx here: through httpx (client and httpcore pool) one forwarded request cost about
0.5 ms of the gateway's CPU and degraded with concurrency (550 req/s at 16 connections against
a fake upstream that serves 9,000), which alone broke the overhead budget; see
bench/gateway_overhead.py.  This pool parses with httptools (the C parser uvicorn uses), keeps
idle connections per endpoint (LIFO), and streams body chunks as they arrive, with flow
control.  httpx still does the gateway's other HTTP (health checks), and its exception types
are what this module raises, so callers handle one set of errors.  Every new connection asks
`Egress` first: no socket is opened to anything the policy does not list.
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

_HIGH_WATER = 64  # buffered body chunks before we stop reading from the socket


class Endpoint(NamedTuple):
    scheme: str
    host: str
    port: int
    base_path: str  # e.g. "/v1"

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname or "", port, parts.path.rstrip("/"))


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.got_response = False
        self.headers_done = asyncio.Event()
        self.chunks: deque[bytes] = deque()
        self.readable = asyncio.Event()
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.paused = False

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
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

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


class UpstreamResponse:
    """The part of httpx.Response's interface the relay uses."""

    def __init__(self, pool: UpstreamPool, endpoint: Endpoint, conn: _Connection,
                 read_timeout: float | None) -> None:
        self.status_code = conn.status
        self.headers = conn.headers
        self._pool, self._endpoint, self._conn = pool, endpoint, conn
        self._timeout = read_timeout
        self._released = False

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
            self._pool.release(self._endpoint, self._conn)


class UpstreamPool:
    def __init__(self, egress: Egress, *, connect_timeout: float, read_timeout: float,
                 max_idle_per_endpoint: int = 64) -> None:
        self._egress = egress
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_idle = max_idle_per_endpoint
        self._idle: dict[Endpoint, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def _connect(self, endpoint: Endpoint) -> _Connection:
        address = await self._egress.address_for(endpoint.host, endpoint.port)
        context = None
        if endpoint.scheme == "https":
            self._ssl = self._ssl or ssl.create_default_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                _Connection, address, endpoint.port, ssl=context,
                server_hostname=endpoint.host if context else None), self._connect_timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"timed out connecting to {endpoint.host}:"
                                       f"{endpoint.port}") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {endpoint.host}:{endpoint.port}: "
                                     f"{exc.strerror or exc}") from None
        return conn

    def release(self, endpoint: Endpoint, conn: _Connection) -> None:
        idle = self._idle.setdefault(endpoint, [])
        if conn.reusable() and len(idle) < self._max_idle:
            conn.reset()
            idle.append(conn)
        else:
            conn.close()

    async def send(self, endpoint: Endpoint, path: str, headers: dict[str, str],
                   body: bytes) -> UpstreamResponse:
        """POST `body` to `endpoint` + `path`; the response body is read by the caller."""
        lines = [f"POST {endpoint.base_path}{path} HTTP/1.1",
                 f"host: {endpoint.host}:{endpoint.port}", f"content-length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        idle = self._idle.get(endpoint)
        conn = None
        while idle and conn is None:
            candidate = idle.pop()
            conn = None if candidate.closed else candidate
        if conn is not None:
            try:
                return await self._exchange(endpoint, conn, request)
            except httpx.RemoteProtocolError:
                if conn.got_response:
                    raise
                # The server had closed this idle connection before reading our request:
                # nothing was processed, so sending it again on a new connection is safe.
        return await self._exchange(endpoint, await self._connect(endpoint), request)

    async def _exchange(self, endpoint: Endpoint, conn: _Connection,
                        request: bytes) -> UpstreamResponse:
        conn.transport.write(request)
        try:
            await asyncio.wait_for(conn.headers_done.wait(), self._read_timeout)
        except TimeoutError:
            conn.close()
            raise httpx.ReadTimeout("timed out waiting for the response headers") from None
        if conn.error is not None:
            conn.close()
            raise conn.error
        return UpstreamResponse(self, endpoint, conn, self._read_timeout)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

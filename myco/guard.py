"""What both servers check before an app sees a request; every refusal is OpenAI's envelope.

Connections (`protocol`): uvicorn 0.54's httptools protocol has no header read timeout, no bound
on header size or count, and its `limit_concurrency` ignores half-sent requests.  Here headers
must arrive within `header_timeout` (else the connection is closed), `max_header_bytes` and
`max_headers` (else 431); a connection over `max_connections` is answered 503 as it opens.
Requests (`request_guard`, Litestar middleware), against a page in the user's browser: `Host`
must be loopback, the address the connection arrived on, or a name allowed (a page whose name
was rebound here still sends its own), else 400; a body must be `application/json` (a form or
`text/plain` POST needs no CORS preflight), else 415; CORS only for origins the policy names.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, cast

import msgspec
from litestar.config.cors import CORSConfig
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPScope, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from myco.errors import BadRequest, UnsupportedMediaType, encode_error, type_for_status


class ConnectionLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Settings both processes share (`MYCO_GATEWAY_*`, `MYCO_NODE_*`)."""

    header_timeout: float = 10.0  # seconds from a connection's or request's start to its headers
    max_header_bytes: int = 64 * 1024  # request line and headers
    max_headers: int = 100
    max_connections: int = 256  # open at once, idle keep-alive ones included


class LimitedProtocol(HttpToolsProtocol):
    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _deadline: asyncio.TimerHandle | None = None
    _in_headers = True  # from a connection's or request's start to its complete headers
    _raw_bytes = 0  # of chunks that began and ended inside the headers
    _refusal: tuple[int, str, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "too_many_connections", "the server has its most open "
                         f"connections ({self.limits.max_connections}); try again shortly")
        else:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        in_headers = self._in_headers
        super().data_received(data)
        # httptools holds a header until it is complete: count what it holds (a chunk that
        # also holds a body is counted exactly in on_headers_complete).
        if in_headers and self._in_headers and not self.transport.is_closing():
            self._raw_bytes += len(data)
            if self._raw_bytes > self.limits.max_header_bytes:
                self._refuse(*self._too_large)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._raw_bytes = True, 0
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        if len(self.headers) > self.limits.max_headers:
            self._stop(431, "too_many_headers", f"more than {self.limits.max_headers} headers")
        if len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers) > \
                self.limits.max_header_bytes:
            self._stop(*self._too_large)
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error, which is also where `_stop` lands."""
        self._refuse(*(self._refusal or (400, "invalid_http", "invalid HTTP request")))

    @property
    def _too_large(self) -> tuple[int, str, str]:
        return 431, "header_too_large", f"headers over {self.limits.max_header_bytes} bytes"

    def _stop(self, status: int, code: str, message: str) -> None:
        self._refusal = (status, code, message)
        raise ValueError(message)  # httptools stops parsing, uvicorn calls send_400_response

    def _refuse(self, status: int, code: str, message: str) -> None:
        body = encode_error(message, type_for_status(status), None, code)
        head = [STATUS_LINE[status], *(k + b": " + v + b"\r\n"
                                       for k, v in self.server_state.default_headers)]
        self.transport.write(b"".join(head) + b"content-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (len(body), body))
        self.transport.close()

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.limits.header_timeout, self.transport.close)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def protocol(limits: ConnectionLimits) -> type[LimitedProtocol]:
    """The protocol class to give uvicorn as `http=`, enforcing `limits`."""
    return cast(type[LimitedProtocol], type("Limited", (LimitedProtocol,), {"limits": limits}))


def host_name(header: str) -> str:
    """The host of a `Host` header: no port, no brackets, lower case, no trailing dot."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


@functools.lru_cache(maxsize=1024)  # pure; spares the hot path parsing the same few hosts
def host_allowed(header: str | None, server: str | None, names: frozenset[str]) -> bool:
    """Whether a request with `Host: header` (None: absent, which no browser sends) that
    arrived on local address `server` may be served."""
    if header is None:
        return True
    name = host_name(header)  # ("::ffff:" is how a dual-stack socket shows an IPv4 address)
    if name in names or name in ("localhost", (server or "localhost").removeprefix("::ffff:")):
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(name).is_loopback
    return False


def allowed_names(listen: str, extra: Iterable[str]) -> frozenset[str]:
    """Host names besides loopback and the connection's own address: the listen host, `extra`
    and, listening on every interface, this machine's name (as LAN clients may type it)."""
    names = {listen, *extra}
    if listen in ("", "0.0.0.0", "::"):  # (a Host of 0.0.0.0 is no name of this machine)
        names = {*extra, socket.gethostname(), f"{socket.gethostname()}.local"}
    return frozenset(host_name(name) for name in names if name)


def check(scope: HTTPScope, names: frozenset[str] | None) -> None:
    """Raise the refusal for a request that fails a check (`names` None: any Host)."""
    host, types = None, set()
    for key, value in scope["headers"]:
        if key == b"host":
            host = value.decode("latin-1")
        elif key == b"content-type":
            types.add(value.decode("latin-1").partition(";")[0].strip().lower())
    server = scope.get("server")
    if names is not None and not host_allowed(host, server[0] if server else None, names):
        raise BadRequest(f"Host {host_name(host or '')[:100]!r} is not a name this server "
                         "answers to (loopback, its own addresses, and its allowed_hosts)",
                         param="Host", code="host_not_allowed")
    if scope["method"] not in ("GET", "HEAD", "OPTIONS") and types != {"application/json"}:
        raise UnsupportedMediaType(f"Content-Type must be application/json, not "
                                   f"{', '.join(types)[:100] or 'absent'}", param="Content-Type")


def request_guard(names: frozenset[str] | None) -> Callable[[ASGIApp], ASGIApp]:
    """Litestar middleware: `check` every HTTP request (a refusal is a `MycoError`)."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == ScopeType.HTTP:
                check(scope, names)
            await app(scope, receive, send)
        return guarded
    return middleware


def cors(origins: Sequence[str]) -> CORSConfig | None:
    """CORS for exactly `origins`; None (no CORS header at all) when there are none."""
    return CORSConfig(allow_origins=list(origins), allow_methods=["GET", "POST"],
                      allow_headers=["authorization", "content-type"],
                      expose_headers=["x-request-id", "x-myco-node", "x-myco-rule"]) \
        if origins else None

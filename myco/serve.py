"""Run an ASGI app under uvicorn on a socket we bind ourselves, so port 0 reports its real port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
from typing import Any

import uvicorn

from myco.guard import ConnectionLimits, protocol


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when
    # the listening socket says TCP; without it every response waits ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(app: Any, sock: socket.socket, what: str, tls: ssl.SSLContext | None = None,
          limits: ConnectionLimits | None = None) -> None:
    """Serve on `sock` (see `bind`) until SIGINT/SIGTERM, TLS with `tls`, held to `limits` (else
    guard's defaults), no WebSocket; print `<what> listening on <url>` once accepting."""
    host, port = sock.getsockname()[:2]
    url = f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5,
        ws="none", http=protocol(limits or ConnectionLimits()),
        ssl_context_factory=(lambda *_: tls) if tls else None))

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not (server.started or task.done()):
            await asyncio.sleep(0.01)
        if server.started:
            print(f"{what} listening on {url}", flush=True)
        await task

    # uvicorn re-raises the SIGINT it handled, after its graceful shutdown: that is our exit.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    if not server.started:
        sys.exit(1)

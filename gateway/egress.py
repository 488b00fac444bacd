"""The egress guard: the gateway may only connect to what the policy lists.

`Egress.address_for(host, port)` resolves `host` (numeric spellings such as `2130706433`, `0x7f.1`
or `[::ffff:127.0.0.1]` included, because the system resolver is what a socket would use) and
returns an address that, with `port`, is a listed endpoint; anything else raises `EgressDenied`.
Callers then connect to that checked address, so a name cannot resolve differently between check
and connect.  The gateway's one way out, the forwarding pool (`gateway/pool.py`, health checks
included), asks it before every new connection.  Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterable

import httpx


class EgressDenied(httpx.TransportError):
    """The destination is not listed in the policy."""


def canonical_ip(address: str) -> str:
    ip = ipaddress.ip_address(address.split("%")[0])
    return str(getattr(ip, "ipv4_mapped", None) or ip)


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host` (numeric forms included)."""
    return [canonical_ip(str(info[4][0])) for info in await asyncio.get_running_loop().getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM)]


class Egress:
    """The listed endpoints, resolved (and re-resolved every `ttl` seconds)."""

    def __init__(self, allowed: Iterable[tuple[str, int]], *, ttl: float = 30.0) -> None:
        self._listed = [(host.strip("[]").lower(), port) for host, port in allowed]
        self._ttl = ttl
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._allowed: set[tuple[str, int]] = set()
        self._allowed_at = -1.0

    def allow(self, host: str, port: int) -> None:
        """Add an endpoint: where discovery found a node the policy lists by id.  Only a
        TLS handshake happens there before the node's certificate is checked against the id."""
        if (host.lower(), port) not in self._listed:
            self._listed.append((host.lower(), port))
            self._allowed_at = -1.0

    async def _addresses(self, host: str, port: int) -> list[str]:
        now = time.monotonic()
        if (hit := self._cache.get(host)) is not None and now - hit[0] < self._ttl:
            return hit[1]
        try:
            addresses = await resolve_host(host, port)
        except OSError:
            addresses = []
        self._cache[host] = (now, addresses)
        return addresses

    async def _allowed_addresses(self) -> set[tuple[str, int]]:
        if time.monotonic() - self._allowed_at >= self._ttl:
            self._allowed = {(address, port) for host, port in self._listed
                             for address in await self._addresses(host, port)}
            self._allowed_at = time.monotonic()
        return self._allowed

    async def address_for(self, host: str, port: int) -> str:
        allowed = await self._allowed_addresses()
        for address in await self._addresses(host, port):
            if (address, port) in allowed:
                return address
        raise EgressDenied(f"egress to {host}:{port} refused: not listed in the policy")

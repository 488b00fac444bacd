"""mDNS discovery: which mycoSwarm nodes announce themselves on the gateway's LAN.

Follows python-zeroconf's async browser example.  Discovery only shows: a discovered node is
routed to only if the policy lists it (its id, when the policy gives one, must match).  A node
that stops cleanly sends a goodbye and disappears from `nodes` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from zeroconf import IPVersion, RecordUpdateListener, ServiceStateChange, Zeroconf
from zeroconf._dns import DNSPointer, DNSQuestion
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
from zeroconf.const import _CLASS_IN, _TYPE_PTR

from gateway.policy import Policy
from myco.protocol import SERVICE

log = logging.getLogger("myco.gateway.discovery")


class Discovered(msgspec.Struct, frozen=True):
    key: str  # the mDNS service instance name
    name: str
    id: str
    addresses: tuple[str, ...]
    port: int
    properties: dict[str, str]
    seen_at: float


class _Goodbyes(RecordUpdateListener):
    """Drop a node the moment its goodbye (a PTR with TTL 0) arrives: the browser itself only
    reports the removal when zeroconf's cache next expires records, up to 10 s later."""

    def __init__(self, discovery: Discovery) -> None:
        self._discovery = discovery

    def async_update_records(self, zc: Zeroconf, now: float, records: list[Any]) -> None:
        for record in [update.new for update in records]:
            if isinstance(record, DNSPointer) and record.name == SERVICE and record.ttl == 0:
                self._discovery.remove(record.alias, "said goodbye")


class Discovery:
    def __init__(self, interface: str, *, request_timeout_ms: int = 1000,
                 on_found: Callable[[Discovered], object] | None = None,
                 on_left: Callable[[Discovered], object] | None = None) -> None:
        self._interface = interface
        self._on_found = on_found or (lambda found: None)
        self._on_left = on_left or (lambda found: None)
        self._timeout = request_timeout_ms
        self.nodes: dict[str, Discovered] = {}  # by service instance name
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _changed(self, zeroconf: Zeroconf, service_type: str, name: str,
                 state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self.remove(name, "left")
            return
        self._tasks.add(task := asyncio.ensure_future(self._resolve(zeroconf, service_type, name)))
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if await info.async_request(zeroconf, self._timeout):
            props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
            self.nodes[name] = found = Discovered(
                name, props.get("name") or name.removesuffix("." + SERVICE), props.get("id", ""),
                tuple(info.parsed_addresses()), info.port or 0, props, time.time())
            self._on_found(found)

    def remove(self, name: str, how: str) -> None:
        if (found := self.nodes.pop(name, None)) is not None:
            log.info("mDNS: %s %s", name, how)
            self._on_left(found)

    async def start(self) -> None:
        self._zc = AsyncZeroconf(interfaces=[self._interface], ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE], handlers=[self._changed])
        self._zc.zeroconf.async_add_listener(_Goodbyes(self),
                                             DNSQuestion(SERVICE, _TYPE_PTR, _CLASS_IN))

    async def stop(self) -> None:
        if self._browser is not None:  # the browser before the zeroconf instance
            await self._browser.async_cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._zc is not None:
            await self._zc.async_close()


def _is_ip(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return bool(ipaddress.ip_address(host.strip("[]")))
    return False


def judge(found: Discovered, policy: Policy) -> tuple[str | None, str]:
    """(the policy's name for a discovered node or None, why): pure.  An announcement only
    claims an id; the certificate is checked when the gateway connects."""
    for node in policy.nodes.values():
        if node.id is not None and node.id == found.id:
            if node.address is not None and _is_ip(node.address.rpartition(":")[0]) \
                    and node.address not in {f"{a}:{found.port}" for a in found.addresses}:
                return None, (f"identity mismatch: claims the id of {node.name!r}, which the "
                              f"policy places at {node.address}")
            return node.name, "listed"
    if (pinned := policy.nodes.get(found.name)) is not None and pinned.id is not None:
        return None, f"identity mismatch: {found.name!r} is pinned to {pinned.id}"
    return None, "not in policy"

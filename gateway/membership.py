"""Membership: which listed nodes are where, healthy, and who they are.

`Membership` owns the gateway's knowledge of its nodes: the address of each (from the policy,
or from mDNS discovery for nodes listed by id), the health watcher that polls `/node/info`, and
the judgement of discovered nodes (listed, a stranger, or an impostor whose certificate is not
the id it announces).  Every node is pinned to an id, loopback ones too: a node listed on
loopback without `id` is pinned to the local node's (`local_node_id`), so another process that
takes its port gets nothing; with no such id the node is unhealthy, saying to add `id`.
The data path (gateway/app.py) asks it two things: `peer(name)`, where to send to a node
now, and `views`/`strangers()`, what `resolve` decides on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
import msgspec

from gateway.audit import AuditEntry, AuditLog
from gateway.discovery import Discovered, Discovery, judge
from gateway.egress import Egress
from gateway.policy import Policy
from gateway.pool import ConnectionPool, Peer, WrongPeer
from gateway.resolve import NodeView
from gateway.settings import GatewaySettings, local_node_certificate
from gateway.swarm import SwarmWatcher, Unreachable
from myco.errors import ConfigError
from myco.identity import parse_id
from myco.tls import certificate_id


def local_node_id(configured: str | None, certificate: Path) -> str | None:
    """The id of this machine's node: `configured` (MYCO_GATEWAY_LOCAL_NODE_ID), else that of
    the certificate the node keeps in its default state dir, else None.  ValueError if
    `configured` is not an id."""
    if configured:
        return parse_id(configured)
    try:
        return certificate_id(certificate.read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None


class Membership:
    def __init__(self, settings: GatewaySettings, policy: Policy, pool: ConnectionPool,
                 egress: Egress, audit: AuditLog) -> None:
        self.settings, self.policy = settings, policy
        self.pool, self.egress, self.audit = pool, egress, audit
        self.addresses: dict[str, str | None] = {n.name: n.address for n in policy.nodes.values()}
        try:
            local = local_node_id(settings.local_node_id, local_node_certificate())
        except ValueError as exc:
            raise ConfigError("MYCO_GATEWAY_LOCAL_NODE_ID", str(exc)) from None
        self.pins: dict[str, str | None] = {n.name: n.id or local for n in policy.nodes.values()}
        self.watcher = SwarmWatcher(policy.nodes, self._node_info,
                                    interval=settings.health_interval,
                                    timeout=settings.health_timeout, on_unhealthy=self._lost)
        self.discovery = Discovery(settings.discover, on_found=self._found,
                                   on_left=self._left) if settings.discover else None
        self.impostors: dict[str, str] = {}  # mDNS key -> why its certificate failed the check
        self._checks: set[asyncio.Task[None]] = set()
        self._recorded: set[tuple[str, str]] = set()

    async def start(self) -> None:
        await self.watcher.start()
        if self.discovery is not None:
            await self.discovery.start()

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        await self.watcher.stop()

    @property
    def views(self) -> dict[str, NodeView]:
        return self.watcher.views

    def peer(self, name: str) -> Peer | None:
        """Where to reach node `name` now (None: not discovered yet, or no id to pin it to)."""
        address, pin = self.addresses[name], self.pins[name]
        return Peer.for_node(address, pin) if address and pin else None

    def node_id(self, name: str) -> str | None:
        """The id `name` must prove (None: none is known, it is never contacted)."""
        return self.pins[name]

    def certificate(self, name: str) -> str:
        info = self.watcher.infos.get(name)
        return info.certificate if info else ""

    async def _node_info(self, name: str) -> bytes:
        if self.pins[name] is None:  # the local node may create its identity after we start
            self.pins[name] = local_node_id(None, local_node_certificate())
        if self.pins[name] is None:
            raise Unreachable(f"listed on loopback without `id`, and this machine's node id is "
                              "not known: add `id = \"...\"` (what `myco node id` prints) to "
                              f"[nodes.{name}] in the policy, or set MYCO_GATEWAY_LOCAL_NODE_ID")
        if (peer := self.peer(name)) is None:
            raise Unreachable("not discovered yet (listed by id; no mDNS announcement seen)")
        return await self._info_at(peer)

    async def _info_at(self, peer: Peer) -> bytes:
        status, body = await self.pool.call(peer, "/node/info", self.settings.health_timeout)
        if status != 200:
            raise ValueError(f"/node/info answered {status}")
        return body

    def _lost(self, name: str, reason: str) -> None:
        """A healthy node failed its health check: fail what is in flight to it now."""
        peer = self.peer(name)
        if peer is not None:
            self.pool.abort(peer.host, peer.port, f"node {name} is unhealthy: {reason}")

    def mark_failed(self, name: str, reason: str) -> None:
        self.watcher.mark_failed(name, reason)

    def judged(self) -> list[tuple[Discovered, str | None, str]]:
        """Every discovered node: (it, the policy's name for it or None, why).  A node is
        rejected if the policy does not list it, if its name or id is pinned elsewhere, or if
        its certificate is not the id it announces."""
        if self.discovery is None:
            return []
        return [(found, None, self.impostors[key]) if key in self.impostors
                else (found, *judge(found, self.policy))
                for key, found in sorted(self.discovery.nodes.items())]

    def strangers(self) -> list[tuple[str, str]]:
        return [(f"{found.name} ({found.id})", why)
                for found, listed, why in self.judged() if listed is None]

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def _reject(self, found: Discovered, why: str) -> None:
        """Record a discovered node that will never be routed to, once, in the audit log."""
        if (found.name, found.id) in self._recorded:
            return
        self._recorded.add((found.name, found.id))
        self.audit.record(AuditEntry(
            time=time.time(), request_id="", endpoint="discovery", model=None, client=None,
            rule="none", target=f"{found.name} ({found.id})", status=403, latency_ms=0.0,
            reason=f"discovered at {', '.join(found.addresses)}:{found.port}: {why}"))

    def _found(self, found: Discovered) -> None:
        """A listed node announced itself: check it now rather than at the next poll (at the
        announced address, if the policy leaves the address to discovery).  One the policy
        does not list is recorded in the audit log, once, and never routed to."""
        listed, why = judge(found, self.policy)
        if listed is None:
            self._reject(found, why)
        elif self.policy.nodes[listed].address is None and found.addresses:
            self._spawn(self._adopt(listed, found))
        else:
            self._spawn(self.watcher.check_some([listed]))

    async def _adopt(self, name: str, found: Discovered) -> None:
        """Use an announced address for `name` once the certificate there has its id (or,
        while it has no address yet, one that does not answer: every connection is pinned,
        and the health checks say why).  Every address is tried: anyone can announce records
        for a node's host name."""
        pin, mismatches, silent = self.pins[name], [], None
        if pin is None:  # cannot happen: a node listed without address has an id (policy.py)
            return
        for host in found.addresses:
            self.egress.allow(host, found.port)
            try:
                await self._info_at(Peer.for_node(f"{host}:{found.port}", pin))
            except WrongPeer as exc:
                mismatches.append(str(exc))
            except httpx.HTTPError:
                silent = silent or host
            else:
                await self._use(name, f"{host}:{found.port}", found)
                return
        if silent is not None and self.addresses[name] is None:
            await self._use(name, f"{silent}:{found.port}", found)
        elif mismatches and len(mismatches) == len(found.addresses):
            why = f"identity mismatch: announces the id of {name!r}, but " + "; ".join(mismatches)
            self.impostors[found.key] = why
            self._reject(found, why)

    async def _use(self, name: str, address: str, found: Discovered) -> None:
        self.impostors.pop(found.key, None)
        self.addresses[name] = address
        await self.watcher.check_some([name])

    def _left(self, found: Discovered) -> None:
        """A node said goodbye: stop routing to it now (its next good check brings it back)."""
        self.impostors.pop(found.key, None)
        listed, _ = judge(found, self.policy)
        if listed is not None:
            self.watcher.mark_failed(listed, "left the network (mDNS goodbye)")

    def swarm(self) -> dict[str, Any]:
        """GET /v1/swarm: every listed node as the gateway sees it, and what discovery found."""
        nodes = []
        for name in self.policy.nodes:
            view, info = self.watcher.views[name], self.watcher.infos.get(name)
            nodes.append({"name": name, "address": self.addresses[name], "id": self.pins[name],
                          "healthy": view.healthy, "reason": view.reason,
                          "models": sorted(view.models or ()),
                          "loaded": info.loaded if info else [],
                          "queue": info.queue if info else {},
                          "slots": info.slots if info else None,
                          "threads": info.threads if info else None,
                          "splits": info.splits if info else {}, "lent": info.lent if info else [],
                          "role": info.capabilities.role if info else None})
        discovered = [{**msgspec.to_builtins(found), "listed_as": listed, "status": why}
                      for found, listed, why in self.judged()]
        return {"nodes": nodes, "discovered": discovered}

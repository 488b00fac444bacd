"""The gateway's view of the swarm: which listed nodes are healthy and what models they serve.

`SwarmWatcher` polls each listed node's `/node/info` every `interval` seconds (timeout per
check), and turns the answers into `NodeView`s that `resolve` reads.  A failed check marks the
node unhealthy with the reason; the next good one brings it back.  Only listed nodes are polled;
upstreams are never contacted in the background (a cloud API hears from us only when a request
is routed to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
import msgspec

from gateway.policy import Node
from gateway.resolve import NodeView

log = logging.getLogger("myco.gateway.swarm")


class _ModelFit(msgspec.Struct):
    model: str
    fit: str


class _Capabilities(msgspec.Struct):
    role: str = ""
    models: list[_ModelFit] = []


class NodeInfo(msgspec.Struct):
    """The fields of a node's `/node/info` the gateway reads."""

    name: str = ""
    models: list[dict[str, Any]] = []
    capabilities: _Capabilities = msgspec.field(default_factory=_Capabilities)
    loaded: list[str] = []
    queue: dict[str, int] = {}


def view_from_info(name: str, info: NodeInfo) -> NodeView:
    fits = {f.model: f.fit for f in info.capabilities.models}
    served = frozenset(str(m["id"]) for m in info.models if fits.get(str(m["id"])) != "none")
    return NodeView(name, True, served)


class SwarmWatcher:
    def __init__(self, nodes: dict[str, Node], client: httpx.AsyncClient, *,
                 interval: float = 1.0, timeout: float = 1.0) -> None:
        self._nodes = nodes
        self._client = client
        self._interval = interval
        self._timeout = timeout
        self.views: dict[str, NodeView] = {
            name: NodeView(name, False, None, "not checked yet") for name in nodes}
        self.infos: dict[str, NodeInfo] = {}
        self._task: asyncio.Task[None] | None = None
        self._decoder = msgspec.json.Decoder(NodeInfo)

    async def check(self, node: Node) -> NodeView:
        try:
            response = await self._client.get(f"http://{node.address}/node/info",
                                               timeout=self._timeout)
            if response.status_code != 200:
                raise ValueError(f"/node/info answered {response.status_code}")
            info = self._decoder.decode(response.content)
        except (httpx.HTTPError, ValueError, msgspec.DecodeError) as exc:
            reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            previous = self.views.get(node.name)
            models = previous.models if previous else None
            return NodeView(node.name, False, models, f"health check failed ({reason})")
        self.infos[node.name] = info
        return view_from_info(node.name, info)

    async def check_all(self) -> None:
        await self.check_some(list(self._nodes))

    async def check_some(self, names: list[str]) -> None:
        """Check these listed nodes now (also used when discovery sees one appear)."""
        views = await asyncio.gather(*(self.check(self._nodes[n]) for n in names))
        for view in views:
            before = self.views.get(view.name)
            if before is None or before.healthy != view.healthy:
                log.info("node %s is %s%s", view.name, "healthy" if view.healthy else "unhealthy",
                         "" if view.healthy else f": {view.reason}")
            self.views[view.name] = view

    def mark_failed(self, name: str, reason: str) -> None:
        """A forward to `name` could not connect: stop routing to it until it answers again."""
        before = self.views.get(name)
        if before is not None:
            self.views[name] = NodeView(name, False, before.models, reason)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await asyncio.wait_for(self.check_all(), self._timeout + self._interval)
            except Exception:  # a background loop logs and goes on
                log.exception("swarm check failed")

    async def start(self) -> None:
        if self._nodes:
            await self.check_all()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

"""The gateway's view of the swarm: which listed nodes are healthy and what models they serve.

`SwarmWatcher` polls each listed node's `/node/info` every `interval` seconds (timeout per
check), and turns the answers into `NodeView`s that `resolve` reads.  A failed check marks the
node unhealthy with the reason, and tells `on_unhealthy` when a healthy node fails (the gateway
then fails the requests in flight to it rather than let them hang); the next good check brings
it back.  Only listed nodes are polled, through `fetch` (the gateway's pinned mutual-TLS pool);
upstreams are never contacted in the background (a cloud API hears from us only when a request
is routed to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

import httpx
import msgspec

from gateway.policy import model_key
from gateway.resolve import NodeView
from myco.protocol import NodeInfo

log = logging.getLogger("myco.gateway.swarm")


def view_from_info(name: str, info: NodeInfo) -> NodeView:
    fits = {f.model: f.fit for f in info.capabilities.models}
    stored = frozenset(str(m.get("id")) for m in info.models)
    served = frozenset(m for m in stored if fits.get(m) != "none")
    return NodeView(name, True, served, stored=stored, shapes=info.shapes,
                    rpc=info.rpc.protocol, lends=info.rpc.devices, slots=info.slots,
                    pending={model_key(m): n for m, n in info.queue.items()})


Fetch = Callable[[str], Awaitable[bytes]]  # node name -> its /node/info body


class Unreachable(Exception):
    """The node cannot be checked (yet): no address is known for it."""


class SwarmWatcher:
    def __init__(self, names: Iterable[str], fetch: Fetch, *, interval: float = 1.0,
                 timeout: float = 1.0,
                 on_unhealthy: Callable[[str, str], object] | None = None) -> None:
        self._names = list(names)
        self._fetch = fetch
        self._interval = interval
        self._timeout = timeout
        self._on_unhealthy = on_unhealthy
        self.views: dict[str, NodeView] = {
            name: NodeView(name, False, None, "not checked yet") for name in self._names}
        self.infos: dict[str, NodeInfo] = {}
        self._task: asyncio.Task[None] | None = None
        self._decoder = msgspec.json.Decoder(NodeInfo)

    async def check(self, name: str) -> NodeView:
        try:
            info = self._decoder.decode(
                await asyncio.wait_for(self._fetch(name), self._timeout))
        except Unreachable as exc:
            return self._failed(name, str(exc))
        except TimeoutError:
            return self._failed(name, "health check failed (no answer within "
                                f"{self._timeout:g} s)")
        except (httpx.HTTPError, ValueError, msgspec.DecodeError) as exc:
            reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            return self._failed(name, f"health check failed ({reason})")
        self.infos[name] = info
        return view_from_info(name, info)

    def _failed(self, name: str, reason: str) -> NodeView:
        previous = self.views.get(name)
        return NodeView(name, False, previous.models if previous else None, reason)

    async def check_all(self) -> None:
        await self.check_some(self._names)

    async def check_some(self, names: list[str]) -> None:
        """Check these listed nodes now (also used when discovery sees one appear)."""
        views = await asyncio.gather(*(self.check(n) for n in names))
        for view in views:
            self._set(view)

    def _set(self, view: NodeView) -> None:
        before = self.views.get(view.name)
        if before is None or before.healthy != view.healthy:
            log.info("node %s is %s%s", view.name, "healthy" if view.healthy else "unhealthy",
                     "" if view.healthy else f": {view.reason}")
            if before is not None and before.healthy and self._on_unhealthy is not None:
                self._on_unhealthy(view.name, view.reason)
        self.views[view.name] = view

    def mark_failed(self, name: str, reason: str) -> None:
        """A forward to `name` could not connect, or it left: stop routing to it until it
        answers again."""
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
        if self._names:
            await self.check_all()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

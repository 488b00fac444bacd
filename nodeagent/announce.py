"""mDNS announcement: a node says `_myco._tcp.local.` on its LAN, with its id in TXT records.

Announcing only shows a node; the gateway's policy decides whether it is ever used.  Stopping
unregisters the service, which sends the mDNS goodbye so browsers drop it at once.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from myco.protocol import SERVICE

log = logging.getLogger("myco.node.announce")

PROTOCOL = "1"


class Announcer:
    def __init__(self, interface: str, name: str, port: int, txt: dict[str, str],
                 host_name: str | None = None) -> None:
        self._interface = interface
        self._zc: AsyncZeroconf | None = None
        self._registering: Awaitable[None] | None = None
        self.info = AsyncServiceInfo(
            # mDNS renames a clashing instance ("n1 (2)"): the name it claims is in TXT too.
            SERVICE, f"{name}.{SERVICE}", port=port,
            properties={"v": PROTOCOL, "name": name, **txt},
            addresses=[socket.inet_pton(socket.AF_INET, interface)],
            # A host name of its own: hosts (and namespaces) may share socket.gethostname().
            server=host_name or f"myco-{txt.get('id', name)[:7].lower()}.local.")

    async def start(self) -> None:
        """Begin announcing; probing and the first announcements go on in the background."""
        self._zc = AsyncZeroconf(interfaces=[self._interface], ip_version=IPVersion.V4Only)
        self._registering = await self._zc.async_register_service(self.info, allow_name_change=True)

    async def stop(self) -> None:
        if self._zc is not None:
            if self._registering is not None:
                await self._registering
            # The first await queues the goodbye, the second waits until it has been sent:
            # closing before that would silently drop it.
            await (await self._zc.async_unregister_service(self.info))
            await self._zc.async_close()
            self._zc = None
            log.info("mDNS announcement withdrawn")

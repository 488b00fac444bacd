"""Lending: this node's devices to other nodes' heads, over llama.cpp RPC through the tunnel.

    POST /node/rpc/lease `protocol.LeaseRequest` -> the device's rpc worker (rpcworker.py, on
    127.0.0.1) started unless it runs, the head granted at this node's TunnelExit, which
    relays to it -> `protocol.Lease` {tunnel_port, protocol, device, worker_port}

The exit reaches a worker with sockets the worker makes for it in its own network namespace
(`Lease.dial`): where Linux allows one, no other process can reach the worker's port.  The
weights a worker keeps for reloads are capped (rpccache.py).

ggml's RPC server serves one head at a time: one worker and one lease per device, and a head
reaches one worker here (the exit maps a head to one port).  A lease colliding with another
(same device or same head; another head or model) is refused (Unavailable, naming the holder)
while the holder has a tunnel connection open, else the holder is revoked and its worker
stopped.  The same lease again is granted again.  The reaper ends a lease whose worker died,
or whose head has had no connection for `idle` seconds since the lease or its last connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import sys
import time
from pathlib import Path

from myco import protocol
from myco.errors import BadRequest, Unavailable
from myco.identity import Identity, parse_id
from myco.protocol import Device, LeaseRequest, Lent, NodeId, RpcInfo, RpcVersion
from myco.tls import certificate_id
from nodeagent import capability, child
from nodeagent.hardware import Hardware
from nodeagent.lending import rpc
from nodeagent.lending.rpccache import WeightCache
from nodeagent.lending.tunnel import Stream, TunnelExit

log = logging.getLogger("myco.node.lending")
_READY = re.compile(rb"rpc worker listening on 127\.0\.0\.1:(\d+)")


class Lease:
    def __init__(self, head: str, model: str, device: str, process: asyncio.subprocess.Process,
                 port: int, control: socket.socket) -> None:
        self.head, self.model, self.device = head, model, device
        self.process, self.port, self.control = process, port, control
        self._dialing = asyncio.Lock()  # one request, one socket on `control`
        self.seen = time.monotonic()  # the lease, or the last time its head was connected
        assert process.stdout is not None
        # ggml writes a line per connection to stdout: read it, or a full pipe stalls the worker
        self.draining = asyncio.create_task(_drain(process.stdout))

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def dial(self) -> Stream:
        """A connection to the worker's port, from a socket of the worker's network."""
        async with self._dialing:
            sock = await asyncio.to_thread(_socket_from, self.control)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    async def stop(self) -> None:
        await child.stop(self.process)
        self.control.close()


def _socket_from(control: socket.socket) -> socket.socket:
    """A new TCP socket made by the rpc worker at the other end of `control` (SCM_RIGHTS)."""
    control.sendall(b"s")
    if not (fds := socket.recv_fds(control, 1, 1)[1]):
        raise ConnectionError("the rpc worker is gone")
    return socket.socket(fileno=fds[0])


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(1 << 16):
        pass


def _build() -> tuple[RpcVersion | None, list[str]]:
    """This build's RPC protocol and ggml's GPU device names (it imports llama.cpp)."""
    version = rpc.protocol_version()
    return version, [n for n in rpc.device_names() if n.startswith("CUDA")] if version else []


class Lender:
    def __init__(self, identity: Identity, *, host: str, cache_dir: Path, threads: int,
                 idle: float, memory_limit: int | None, cache_limit: int,
                 ready_timeout: float = 30.0) -> None:
        self.exit = TunnelExit(identity)
        self.cache = WeightCache(cache_dir, cache_limit)
        self.protocol: RpcVersion | None = None
        self.leases: dict[str, Lease] = {}  # device -> lease
        self._host, self._threads, self._lock = host, threads, asyncio.Lock()
        self._idle, self._limit, self._ready_timeout = idle, memory_limit, ready_timeout
        self._gpus: list[str] = []
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.protocol, self._gpus = await asyncio.to_thread(_build)
        if self.protocol is None:
            log.info("this llama.cpp build has no RPC (-DGGML_RPC=on): this node lends nothing")
            return
        await self.exit.start(self._host)
        self.cache.start()
        self._reaper = asyncio.create_task(self._reap(min(1.0, self._idle / 4)))

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await self.exit.close()
        self.cache.close()
        await asyncio.gather(*(lease.stop() for lease in self.leases.values()))

    def info(self, hw: Hardware) -> RpcInfo:
        """/node/info's "rpc": the protocol, the tunnel port, each device and what it lends."""
        if self.protocol is None:
            return RpcInfo()
        limit = sys.maxsize if self._limit is None else self._limit
        cpu = Device("cpu", "CPU", min(max(0, hw.ram_available - capability.RAM_RESERVE), limit))
        nvidia = [g for g in hw.gpus if g.vendor == "nvidia"]
        return RpcInfo(self.protocol, self.exit.port, (cpu, *(
            Device("gpu", f"CUDA{i}", min(g.memory_free, limit))
            for i, g in enumerate(nvidia) if f"CUDA{i}" in self._gpus)))

    def lent(self) -> tuple[Lent, ...]:
        return tuple(Lent(NodeId(lease.head), lease.model, device, lease.port,
                          lease.process.pid, self.exit.connections(lease.head))
                     for device, lease in sorted(self.leases.items()))

    async def lease(self, req: LeaseRequest) -> protocol.Lease:
        """Lend `req.device` to the head; BadRequest for a bad id, certificate or device,
        Unavailable without RPC, when the device or the head is in use, or the worker fails."""
        if (version := self.protocol) is None:
            raise Unavailable("this node's llama.cpp was built without RPC (-DGGML_RPC=on): "
                              "it lends no device")
        if req.device not in ("CPU", *self._gpus):
            raise BadRequest(f"no device {req.device!r} to lend here; this node lends "
                             f"{', '.join(('CPU', *self._gpus))}", param="device")
        try:
            head, found = parse_id(req.head_id), certificate_id(req.head_certificate)
        except ValueError as exc:
            raise BadRequest(f"invalid head_id or head_certificate: {exc}") from None
        if found != head:
            raise BadRequest(f"head_certificate is {found}, not {head}", param="head_certificate")
        async with self._lock:
            lease = self.leases.get(req.device)
            if lease is None or not lease.alive or (lease.head, lease.model) != (head, req.model):
                for other in [x for x in self.leases.values() if head == x.head
                              or req.device == x.device]:
                    if other.alive and self.exit.connections(other.head):
                        raise Unavailable(f"{other.device} of this node is lent to head "
                                          f"{other.head} for {other.model}, which is using it")
                    await self._end(other, "replaced" if other.alive else "its worker exited")
                lease = await self._start_worker(head, req.model, req.device)
                self.leases[req.device] = lease
            self.exit.grant(head, req.head_certificate, lease.dial)
            lease.seen = time.monotonic()
        log.info("lent %s to head %s for %s (rpc worker 127.0.0.1:%d, pid %d)", req.device,
                 head, req.model, lease.port, lease.process.pid)
        return protocol.Lease(self.exit.port, version, req.device, lease.port)

    async def _start_worker(self, head: str, model: str, device: str) -> Lease:
        ours, theirs = socket.socketpair()
        with theirs:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nodeagent.lending.rpcworker", "--port", "0", "--cache-dir",
                str(self.cache.dir_for(head)), "--threads", str(self._threads), "--device",
                device, "--control-fd", str(theirs.fileno()), pass_fds=(theirs.fileno(),),
                stdout=asyncio.subprocess.PIPE, env=child.env())
        assert process.stdout is not None
        ours.settimeout(self._ready_timeout)
        ready = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._ready_timeout):
                while ready is None and (line := await process.stdout.readline()):
                    ready = _READY.search(line)
        if ready is None:
            ours.close()
            await child.stop(process)
            raise Unavailable(f"the rpc worker for {device} did not start (exit code "
                              f"{process.returncode}); see the node log")
        return Lease(head, model, device, process, int(ready[1]), ours)

    async def _end(self, lease: Lease, why: str) -> None:
        del self.leases[lease.device]
        self.exit.revoke(lease.head)
        await lease.stop()
        log.info("ended the lease of %s to head %s (%s)", lease.device, lease.head, why)

    async def _reap(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(30), self._lock:
                    now = time.monotonic()
                    for lease in list(self.leases.values()):
                        if not lease.alive:
                            await self._end(lease, f"its worker exited with "
                                                   f"{lease.process.returncode}")
                        elif self.exit.connections(lease.head):
                            lease.seen = now
                        elif now - lease.seen >= self._idle:
                            await self._end(lease, f"no connection for {self._idle:g} s")
            except Exception:
                log.exception("reaping leases failed; trying again")

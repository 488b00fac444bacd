"""The agent's pool of runner children (nodeagent/runner/): one per loaded model, started on
first use, supervised, queued.

`RunnerPool.get(model, split)` returns a ready `Runner`, starting `python -m nodeagent.runner`
for it if none is alive (a runner that died is started again on the next request), or if the
one alive was loaded with another split (a `protocol.Split`, or None: all local).  A split runner
reaches each worker node through a `TunnelEntrance` of its own, closed when it stops.  Each
runner decodes `slots` requests at once and has a bounded queue behind them: `Runner.admit()`
raises `Busy` (429 with Retry-After) when both are full; a request holds its place until its
response is closed (a stream: relayed to the end).
`unload_idle` stops runners with nothing in flight for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import httpx
import msgspec

from myco.errors import Busy, Unavailable
from myco.identity import Identity
from myco.protocol import Split
from nodeagent import child
from nodeagent.lending.tunnel import TunnelEntrance
from nodeagent.runner import loadrecord
from nodeagent.store import ModelMeta

log = logging.getLogger("myco.node.runners")


class Runner:
    def __init__(self, meta: ModelMeta, process: asyncio.subprocess.Process, socket: str,
                 places: int, retry_after: int, split: Split | None = None,
                 entrances: Sequence[TunnelEntrance] = ()) -> None:
        self.meta, self.process, self.socket = meta, process, socket
        self.split, self.entrances = split, entrances
        self.record: loadrecord.LoadRecord | None = None  # the runner's GET /load, once ready
        self.client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=socket),
                                        base_url="http://runner",
                                        timeout=httpx.Timeout(None, connect=5.0))
        self.pending, self.last_used = 0, time.monotonic()
        self._places, self._retry_after = places, retry_after  # places: slots + queue

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place in this runner's queue for the duration of a request."""
        if self.pending >= self._places:
            raise Busy(f"model {self.meta.id} has {self.pending} requests running or queued; "
                       "retry later", retry_after=self._retry_after)
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1
            self.last_used = time.monotonic()

    async def busy(self) -> int | None:
        """Slots generating now, as the runner says."""
        try:
            answer = await self.client.get("/health", timeout=1.0)
            return int(answer.json()["busy"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    async def stop(self) -> None:
        await self.client.aclose()
        await child.stop(self.process)
        for entrance in self.entrances:
            await entrance.close()


class RunnerPool:
    def __init__(self, *, n_ctx: int, slots: int, queue_size: int, load_timeout: float,
                 threads: int, retry_after: int = 1, identity: Identity | None = None) -> None:
        self._identity = identity  # what split runners' tunnel entrances present
        self._n_ctx, self._slots, self._queue_size = n_ctx, slots, queue_size
        self._load_timeout, self._threads, self._retry_after = load_timeout, threads, retry_after
        self._dir = tempfile.mkdtemp(prefix="myco-runners-")
        self._serial = itertools.count()  # socket names: never one of a runner still stopping
        self._runners: dict[str, Runner] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.waiting: dict[str, int] = {}  # requests waiting for a model to load

    @property
    def runners(self) -> dict[str, Runner]:
        return {k: r for k, r in self._runners.items() if r.alive}

    def queue_depths(self) -> dict[str, int]:
        depths = dict(self.waiting)
        for model_id, runner in self.runners.items():
            depths[model_id] = depths.get(model_id, 0) + runner.pending
        return {k: v for k, v in depths.items() if v}

    async def get(self, meta: ModelMeta, split: Split | None = None) -> Runner:
        runner = self._runners.get(meta.id)
        if runner is not None and runner.alive and runner.split == split:
            return runner
        if self.waiting.get(meta.id, 0) >= self._slots + self._queue_size:
            raise Busy(f"model {meta.id} is loading with {self.waiting[meta.id]} requests waiting",
                       retry_after=self._retry_after)
        self.waiting[meta.id] = self.waiting.get(meta.id, 0) + 1
        try:
            async with self._locks.setdefault(meta.id, asyncio.Lock()):
                runner = self._runners.get(meta.id)
                if runner is None or not runner.alive or runner.split != split:
                    if runner is not None:
                        if runner.alive:
                            log.info("stopping the runner for %s: another split was asked for",
                                     meta.id)
                        else:
                            log.warning("runner for %s exited with %s; starting a new one",
                                        meta.id, runner.process.returncode)
                        del self._runners[meta.id]
                        await runner.stop()
                    runner = await self._start(meta, split)
                    self._runners[meta.id] = runner
                return runner
        finally:
            self.waiting[meta.id] -= 1

    async def _tunnels(self, meta: ModelMeta,
                       split: Split) -> tuple[list[str], list[TunnelEntrance]]:
        """The runner's split flags, and a tunnel entrance per worker (listening)."""
        assert self._identity is not None, "a split needs the node's identity"
        log.info("split for %s: n_gpu_layers %d, tensor_split %s, workers %s", meta.id,
                 split.n_gpu_layers, list(split.tensor_split),
                 ", ".join(f"{w.node} ({w.host}:{w.tunnel_port})" for w in split.workers))
        entrances = [TunnelEntrance(self._identity, w.host, w.tunnel_port, w.id)
                     for w in split.workers]
        args = ["--n-gpu-layers", str(split.n_gpu_layers)]
        if split.tensor_split:
            args += ["--tensor-split", ",".join(map(str, split.tensor_split))]
        for entrance in entrances:
            args += ["--rpc", f"127.0.0.1:{await entrance.start()}"]
        log.info("tunnels up for %s: %s", meta.id, ", ".join(
            f"127.0.0.1:{e.port} -> {e.remote_id} at {e.remote[0]}:{e.remote[1]}"
            for e in entrances) or "none")
        return args, entrances

    async def _start(self, meta: ModelMeta, split: Split | None) -> Runner:
        socket = os.path.join(self._dir, f"{next(self._serial)}.sock")
        args = [sys.executable, "-m", "nodeagent.runner", "--model", meta.path, "--id", meta.id,
                "--socket", socket, "--n-ctx", str(self._n_ctx), "--parallel", str(self._slots),
                "--threads", str(self._threads)]
        flags, entrances = await self._tunnels(meta, split) if split else ([], [])
        log.info("starting runner for %s (%.0f MB)", meta.id, meta.file_size / 1e6)
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(*args, *flags, env=child.env())
        runner = Runner(meta, process, socket, self._slots + self._queue_size,
                        self._retry_after, split, entrances)
        while time.monotonic() < started + self._load_timeout:
            if not runner.alive:
                await runner.stop()
                raise Unavailable(f"runner for {meta.id} exited with code "
                                  f"{process.returncode} while loading; see the node log")
            if os.path.exists(socket):
                with contextlib.suppress(httpx.TransportError):
                    if (await runner.client.get("/health")).status_code == 200:
                        runner.record = msgspec.json.decode(
                            (await runner.client.get("/load")).content,
                            type=loadrecord.LoadRecord | None)
                        log.info("runner for %s ready in %.1f s%s", meta.id,
                                 time.monotonic() - started, ", split verified" if split else "")
                        return runner
            await asyncio.sleep(0.05)
        await runner.stop()
        raise Unavailable(f"model {meta.id} did not load within {self._load_timeout:.0f} s")

    async def unload_idle(self, after: float) -> None:
        """Stop every runner with no request in flight for `after` seconds; runs until
        cancelled, checking every after/4 seconds (at most 5)."""
        while True:
            await asyncio.sleep(min(after / 4, 5.0))
            now = time.monotonic()
            for model_id, runner in list(self._runners.items()):
                if runner.pending == 0 and now - runner.last_used >= after:
                    del self._runners[model_id]  # before awaiting: get() starts a new one
                    log.info("unloading %s: no request for %.0f s", model_id,
                             now - runner.last_used)
                    try:
                        await runner.stop()
                    except Exception:
                        log.exception("stopping the runner for %s failed", model_id)

    async def close(self) -> None:
        await asyncio.gather(*(r.stop() for r in self._runners.values()))
        self._runners.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

"""Runner processes: one child per loaded model, started on first use, supervised, queued.

`RunnerPool.get(model)` returns a ready `Runner`, starting `python -m nodeagent.runner` for it if
none is alive (a runner that died is started again on the next request).  Each runner has a
bounded queue: `Runner.admit()` raises `Busy` (429 with Retry-After) when it is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx

from myco.errors import Busy, Unavailable
from nodeagent.store import ModelMeta

log = logging.getLogger("myco.node.runners")


class Runner:
    def __init__(self, meta: ModelMeta, process: asyncio.subprocess.Process, socket: str,
                 queue_size: int, retry_after: int) -> None:
        self.meta = meta
        self.process = process
        self.socket = socket
        self.client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=socket),
                                        base_url="http://runner",
                                        timeout=httpx.Timeout(None, connect=5.0))
        self.pending = 0
        self._queue_size = queue_size
        self._retry_after = retry_after

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place in this runner's queue for the duration of a request."""
        if self.pending >= self._queue_size:
            raise Busy(f"model {self.meta.id} has {self.pending} requests queued; retry later",
                       retry_after=self._retry_after)
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def stop(self) -> None:
        await self.client.aclose()
        if self.alive:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


class RunnerPool:
    def __init__(self, *, n_ctx: int, queue_size: int, load_timeout: float,
                 threads: int | None = None, retry_after: int = 1) -> None:
        self._n_ctx = n_ctx
        self._queue_size = queue_size
        self._load_timeout = load_timeout
        self._threads = threads
        self._retry_after = retry_after
        self._dir = tempfile.mkdtemp(prefix="myco-runners-")
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

    async def get(self, meta: ModelMeta) -> Runner:
        runner = self._runners.get(meta.id)
        if runner is not None and runner.alive:
            return runner
        if self.waiting.get(meta.id, 0) >= self._queue_size:
            raise Busy(f"model {meta.id} is loading with {self._queue_size} requests waiting",
                       retry_after=self._retry_after)
        self.waiting[meta.id] = self.waiting.get(meta.id, 0) + 1
        try:
            async with self._locks.setdefault(meta.id, asyncio.Lock()):
                runner = self._runners.get(meta.id)
                if runner is None or not runner.alive:
                    if runner is not None:
                        log.warning("runner for %s exited with %s; starting a new one",
                                    meta.id, runner.process.returncode)
                        await runner.stop()
                    runner = await self._start(meta)
                    self._runners[meta.id] = runner
                return runner
        finally:
            self.waiting[meta.id] -= 1

    async def _start(self, meta: ModelMeta) -> Runner:
        socket = os.path.join(self._dir, f"{len(self._runners)}-{os.getpid()}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket)
        args = [sys.executable, "-m", "nodeagent.runner", "--model", meta.path, "--id", meta.id,
                "--socket", socket, "--n-ctx", str(self._n_ctx)]
        if self._threads:
            args += ["--threads", str(self._threads)]
        log.info("starting runner for %s (%.0f MB)", meta.id, meta.file_size / 1e6)
        process = await asyncio.create_subprocess_exec(*args)
        runner = Runner(meta, process, socket, self._queue_size, self._retry_after)
        deadline = time.monotonic() + self._load_timeout
        while time.monotonic() < deadline:
            if not runner.alive:
                await runner.stop()
                raise Unavailable(f"runner for {meta.id} exited with code "
                                  f"{process.returncode} while loading; see the node log")
            if os.path.exists(socket):
                with contextlib.suppress(httpx.TransportError):
                    if (await runner.client.get("/health")).status_code == 200:
                        return runner
            await asyncio.sleep(0.05)
        await runner.stop()
        raise Unavailable(f"model {meta.id} did not load within {self._load_timeout:.0f} s")

    async def close(self) -> None:
        await asyncio.gather(*(r.stop() for r in self._runners.values()))
        self._runners.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

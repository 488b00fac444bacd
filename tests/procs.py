"""Real processes for tests (`myco` commands and fake upstreams on loopback, port 0), started
and stopped together where they can be, and `wait_for`: a test waits for what it expects to
happen, never for a fixed time."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from myco.identity import Identity, load_or_create

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
POLL = 0.05  # seconds between two looks at a condition


def wait_for(check: Callable[[], T], timeout: float, what: str | Callable[[], str]) -> T:
    """Look at `check()` until it is truthy, and return it; fail naming `what` (a callable: a
    message made at the deadline, showing the state then) if that takes over `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")
        time.sleep(POLL)
    return found


async def wait_for_async(check: Callable[[], T], timeout: float, what: str) -> T:
    """`wait_for` inside an event loop, which it leaves running between looks."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(POLL)
    return found


class Proc:
    """A child process that printed a line matching `ready` (by default `... listening on
    URL`, whose URL is `url`); its output is kept in `lines`.  `node_id`: the id it serves
    mutual TLS with, where it does."""

    node_id = ""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None,
                 timeout: float = 60.0, ready: str = r"listening on (https?://\S+)") -> None:
        self.args = args
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, start_new_session=True)
        self.ready_match = self._wait_ready(timeout, ready)
        self.ready_line = self.lines[-1]
        self.url = self.ready_match.group(1) if self.ready_match.groups() else ""
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _wait_ready(self, timeout: float, ready: str) -> re.Match[str]:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.popen.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(ready, line)
            if found:
                return found
        self.stop()
        raise RuntimeError(f"{' '.join(self.args)} did not start:\n{''.join(self.lines)}")

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    @property
    def address(self) -> str:
        return self.url.split("://", 1)[1]

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        drainer = getattr(self, "_drainer", None)
        if drainer is not None:
            drainer.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode


def stop_all(procs: list[Proc], timeout: float = 15.0) -> None:
    """`Proc.stop` for many at once: their graceful stops (about half a second each) overlap."""
    running = [proc for proc in procs if proc.popen.poll() is None]
    for proc in running:
        proc.popen.send_signal(signal.SIGINT)
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout)
    for proc in procs:
        proc.stop()  # kills what is still running; closes its output


def start_together(*starts: Callable[[], T]) -> list[T]:
    """Call each `start` (which starts a process and waits for it) in a thread of its own:
    processes started together are ready sooner than one after another.  If one fails, the
    `Proc`s the others started are stopped."""
    with ThreadPoolExecutor(len(starts)) as pool:
        futures = [pool.submit(start) for start in starts]
    failed = [error for future in futures if (error := future.exception()) is not None]
    if failed:
        started = [future.result() for future in futures if future.exception() is None]
        stop_all([proc for proc in started if isinstance(proc, Proc)])
        raise failed[0]
    return [future.result() for future in futures]


def myco(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0,
         prefix: list[str] | None = None) -> Proc:
    """`myco ARGS` as a process; `prefix` runs it inside something (a network namespace)."""
    return Proc([*(prefix or []), sys.executable, "-m", "mycoswarm.cli", *args], env=env,
                timeout=timeout)


def fake_upstream(name: str, *models: str, node_for: Identity | None = None) -> Proc:
    """A fake OpenAI server; with `node_for` (a gateway's identity) it serves mutual TLS to
    that gateway, as a node agent paired with it does."""
    args = [sys.executable, "-m", "bench.fake_upstream", "--name", name]
    for model in models:
        args += ["--model", model]
    state = None
    if node_for is not None:
        state = Path(tempfile.mkdtemp(prefix=f"myco-fake-{name}-"))
        args += ["--tls-state", str(state), "--trust", node_for.cert_path]
    proc = Proc(args)
    if state is not None:
        proc.node_id = load_or_create(state, name).id  # the identity it created at start
    return proc


def run_myco(*args: str, env: dict[str, str] | None = None,
             timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mycoswarm.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **(env or {})},
                          timeout=timeout)


def run_myco_here(*args: str) -> subprocess.CompletedProcess[str]:
    """`run_myco` in this process, for a command that ends by itself and configures nothing
    global (`--help`, `policy check`): the same status and output, without a Python start and
    its imports (a third of a second) per call.  What would end `myco` with a traceback ends
    with status 1 and the traceback in stderr here too."""
    from mycoswarm.cli import main

    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except Exception:
            traceback.print_exc()
            status = 1
    return subprocess.CompletedProcess(["myco", *args], status, out.getvalue(), err.getvalue())

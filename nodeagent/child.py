"""The node agent's child processes (model runners, rpc workers): started with `env()`,
stopped with `stop`; each calls `die_with_parent()` first, so Linux kills it when the agent dies
(also of SIGKILL) and no orphan keeps a model in memory or a port open.  Linux ties that to the
parent's thread: the agent starts children from its event loop's thread, which lives as long."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys

PARENT = "MYCO_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def env() -> dict[str, str]:
    """The environment for a child: ours, and our pid for `die_with_parent`."""
    return {**os.environ, PARENT: str(os.getpid())}


def die_with_parent() -> None:
    """Be killed when the parent dies (Linux; elsewhere nothing happens).  Exits at once if the
    parent named in $MYCO_PARENT_PID died before this call could take effect."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = os.environ.get(PARENT)
    if parent and os.getppid() != int(parent):
        sys.exit("the node agent that started this process is gone")


async def stop(process: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns once the process has exited."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            process.kill()
            await process.wait()

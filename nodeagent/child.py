"""The node agent's child processes (model runners, rpc workers): started with `env()`,
stopped with `stop`; each calls `die_with_parent()` first (myco/lifeline.py), so Linux kills it
when the agent dies (also of SIGKILL) and no orphan keeps a model in memory or a port open.
The agent starts children from its event loop's thread, which lives as long as it does."""

from __future__ import annotations

import asyncio

from myco.lifeline import die_with_parent, env

__all__ = ["die_with_parent", "env", "stop"]


async def stop(process: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns once the process has exited."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            process.kill()
            await process.wait()

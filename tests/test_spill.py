"""Load over two real nodes on two hosts (network namespaces), one slot each: a request spills
to the second node while the first one's slot is busy, `least-busy` spreads requests, and a
node killed with requests queued loses none of them (they had not received a byte)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from myco.identity import load_or_create
from tests import netns
from tests.conftest import MODEL_ID
from tests.procs import Proc, wait_for
from tests.test_discovery import Swarm, node_state

why_not = netns.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=why_not or "")


@pytest.fixture
def lan() -> Iterator[netns.Lan]:
    with netns.Lan() as lan:
        yield lan


def policy(ids: dict[str, str]) -> str:
    nodes = "".join(f'[nodes.{n}]\nid = "{i}"\naddress = "{a}:8788"\n'
                    for n, (i, a) in ids.items())
    return nodes + ('[[routes]]\nmatch = { model = "*", endpoint = "completions" }\n'
                    'forward = ["n1", "n2"]\nbalance = "least-busy"\n'
                    '[[routes]]\nforward = ["n1", "n2"]\n')


async def many(url: str, path: str, n: int, meanwhile: Any = None) -> list[httpx.Response]:
    body: dict[str, Any] = {"model": MODEL_ID, "max_tokens": 16, "temperature": 0}
    if path == "/v1/completions":
        body["prompt"] = "Once upon a time"
    else:
        body["messages"] = [{"role": "user", "content": "Tell me a story."}]
    async with httpx.AsyncClient(base_url=url, timeout=180) as client:
        jobs = [asyncio.ensure_future(client.post(path, json=body)) for _ in range(n)]
        if meanwhile is not None:
            await asyncio.to_thread(meanwhile)
        return list(await asyncio.gather(*jobs))


def test_spill_over_least_busy_and_a_node_killed_under_load(
        lan: netns.Lan, models_dir: Path, tmp_path: Path) -> None:
    lan.host("gw")
    addresses = {n: lan.host(n) for n in ("n1", "n2")}
    gateway = load_or_create(tmp_path / "gateway", "gateway")  # the one Swarm starts with
    states = {n: node_state(tmp_path, n, gateway) for n in addresses}
    swarm = Swarm(lan, tmp_path, policy({n: (states[n][1], a) for n, a in addresses.items()}),
                  models_dir)
    nodes: dict[str, Proc] = {}
    try:
        for name, address in addresses.items():
            nodes[name] = swarm.start(
                name, "node", "--host", address, "--port", "8788", "--name", name, "--models",
                str(models_dir), "--n-ctx", "512", "--parallel", "1", "--queue-size", "24",
                "--state-dir", str(states[name][0]))
        url = swarm.gateway.url

        def healthy() -> bool:
            return all(httpx.get(url + "/health", timeout=2).json()["nodes"].values())

        wait_for(healthy, 60, "both nodes healthy")
        # One slot each: while n1 decodes, the next request goes to n2 ("first" spills over).
        answers = asyncio.run(many(url, "/v1/chat/completions", 4))
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        served = [r.headers["x-myco-node"] for r in answers]
        assert served[0] == "n1" and "n2" in served, served
        # least-busy: both serve about half.
        answers = asyncio.run(many(url, "/v1/completions", 6))
        served = [r.headers["x-myco-node"] for r in answers]
        assert sorted(served) == ["n1"] * 3 + ["n2"] * 3, served

        # 20 at once, n1 killed while it holds several of them: every one is answered.
        def kill_n1() -> None:
            wait_for(lambda: httpx.post(url + "/v1/policy/dry-run", timeout=2, json={
                "model": MODEL_ID})
                .json()["candidates"][0]["load"]["busy"] >= 5, 30, "n1 holding 5 requests")
            os.kill(nodes["n1"].popen.pid, signal.SIGKILL)

        answers = asyncio.run(many(url, "/v1/chat/completions", 20, kill_n1))
        assert [r.status_code for r in answers] == [200] * 20, [r.text for r in answers]
        assert {r.headers["x-myco-node"] for r in answers} >= {"n2"}
    finally:
        swarm.close()

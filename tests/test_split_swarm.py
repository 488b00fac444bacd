"""Split inference across real hosts (network namespaces): a gateway, a head and three worker
hosts.  Memory limits make the Gemma 3 270M model too big for the head, so the gateway plans
a split over the nodes the route allows; the head runs it through mutual-TLS tunnels to the
workers' llama.cpp RPC servers, and the load record shows the layers on the remote devices.
Greedy output is token-identical between a 1-worker and a 2-worker split; a plan that cannot
fit is a 503 with the planner's reasons; a worker killed mid-stream ends the stream with an
error and the next request re-plans; nothing but a paired head reaches a worker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bench.split_swarm import limits
from gateway.placement import Plan, Refusal, SplitNode, place
from myco.identity import load_or_create
from myco.protocol import Device, ModelShape
from nodeagent.lending import rpc
from tests import netns
from tests.conftest import MODEL_ID
from tests.procs import Proc, wait_for
from tests.test_discovery import Swarm, node_state

why_not = netns.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=why_not or "")
KEYS = {"KEY_ONE": "one", "KEY_TWO": "two", "KEY_NONE": "none"}
PROMPT = [{"role": "user", "content": "The capital of France is"}]


def policy(ids: dict[str, str]) -> str:
    nodes = "".join(f'[nodes.{n}]\nid = "{i}"\n' for n, i in ids.items())
    clients = "".join(f'[clients.{v}]\nkey_env = "{k}"\n' for k, v in KEYS.items())
    routes = "".join(f'[[routes]]\nmatch = {{ model = "*", client = "{client}" }}\n'
                     f'forward = ["head"]\nsplit = {split}\n'
                     for client, split in (("one", '["head", "wa"]'),
                                           ("two", '["head", "wb", "wc"]'),
                                           ("none", '["head"]')))
    return nodes + clients + routes


@pytest.fixture
def lan() -> Iterator[netns.Lan]:
    with netns.Lan() as lan:
        yield lan


def test_split_inference_across_hosts(lan: netns.Lan, models_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    for host in ("gw", "head", "wa", "wb", "wc"):
        lan.host(host)
    gateway = load_or_create(tmp_path / "gateway", "gateway")
    states = {n: node_state(tmp_path, n, gateway) for n in ("head", "wa", "wb", "wc")}
    swarm = Swarm(lan, tmp_path, policy({n: i for n, (_, i) in states.items()}), models_dir)
    procs: dict[str, Proc] = {}
    try:
        procs["head"] = swarm.node("head", "head", states["head"][0])
        info = httpx.get(procs["head"].url + "/node/info", verify=swarm.tls).json()
        shape = ModelShape(**info["shapes"][MODEL_ID])
        budget = limits(shape)
        procs["head"].stop()
        for name in ("head", "wa", "wb", "wc"):
            procs[name] = swarm.start(
                name, "node", "--host", lan.hosts[name][1], "--port", "8788", "--name", name,
                "--models", str(models_dir) if name == "head" else str(tmp_path / "empty"),
                "--n-ctx", "512", "--state-dir", str(states[name][0]),
                "--memory-limit", str(budget[name]))
        # The limits make the plans this test expects (the planner is pure: ask it first).
        devices = {n: (Device("cpu", "CPU", b),) for n, b in budget.items()}
        nodes = {n: SplitNode(n, n == "head", rpc.protocol_version(), devices[n]) for n in budget}
        plans = {k: place(shape, [nodes[n] for n in names]) for k, names in
                 (("one", ("head", "wa")), ("two", ("head", "wb", "wc")), ("none", ("head",)))}
        assert isinstance(plans["one"], Plan) and plans["one"].workers == ("wa",)
        # Workers register slowest (least memory) first: the last holds the output.
        assert isinstance(plans["two"], Plan) and plans["two"].workers == ("wc", "wb")
        alone = plans["none"]
        assert isinstance(alone, Refusal) and [r.node for r in alone.reasons] == ["head"]
        assert alone.reasons[0].reason == "as head: does not fit alone " \
            f"({budget['head'] / 2**20:.0f} MiB lent), and no worker can join it"

        def clients(key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=swarm.gateway.url + "/v1", api_key=key,
                                 max_retries=0, timeout=120)

        def health() -> bool:
            nodes = httpx.get(swarm.gateway.url + "/health", timeout=2).json()["nodes"]
            return all(nodes.values())

        wait_for(health, 30, "every node healthy")
        dry = httpx.post(swarm.gateway.url + "/v1/policy/dry-run", timeout=5,
                         headers={"authorization": "Bearer one"},
                         json={"model": MODEL_ID}).json()
        assert dry["allowed"] and dry["target"] == "head", dry
        assert dry["plan"]["workers"] == ["wa"]
        assert [d["node"] for d in dry["plan"]["devices"]] == ["head", "wa"]

        def ask(key: str) -> tuple[str, dict[str, Any]]:
            with clients(key) as client:
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL_ID, messages=PROMPT, max_tokens=8, temperature=0)
                text = raw.parse().choices[0].message.content or ""
                streamed = "".join(c.choices[0].delta.content or "" for c in
                                   client.chat.completions.create(
                                       model=MODEL_ID, messages=PROMPT, max_tokens=8,
                                       temperature=0, stream=True) if c.choices)
            assert raw.headers["x-myco-node"] == "head"
            assert streamed == text
            head = httpx.get(procs["head"].url + "/node/info", verify=swarm.tls).json()
            return text, head["splits"][MODEL_ID]

        def loaded(split: dict[str, Any]) -> list[tuple[str, list[int]]]:
            return [(d["name"], d["layers"]) for d in split["record"]["devices"]]

        def planned(plan: Plan | Refusal) -> list[tuple[str, list[int]]]:
            assert isinstance(plan, Plan)
            return [("CPU" if i == 0 else f"RPC{i - 1}", list(range(d.first, d.first + d.count)))
                    for i, d in enumerate(plan.devices)]

        one, split_one = ask("one")
        assert loaded(split_one) == planned(plans["one"])  # the head's CPU, then wa's
        assert [w["node"] for w in split_one["workers"]] == ["wa"]
        two, split_two = ask("two")
        assert loaded(split_two) == planned(plans["two"])
        assert [w["node"] for w in split_two["workers"]] == ["wc", "wb"]
        print(f"1 worker: {one!r}; 2 workers: {two!r}")
        assert one == two  # greedy, token-identical across split topologies

        refused = httpx.post(swarm.gateway.url + "/v1/chat/completions", timeout=30,
                             headers={"authorization": "Bearer none"},
                             json={"model": MODEL_ID, "messages": PROMPT, "max_tokens": 2})
        assert refused.status_code == 503
        assert "no placement for the model" in refused.json()["error"]["message"]

        # Nothing but a paired head reaches a worker: its rpc server is on its loopback, and
        # its tunnel speaks only mutual TLS to heads the gateway leased it to.
        wc = httpx.get(procs["wc"].url + "/node/info", verify=swarm.tls).json()
        tunnel, (lent,) = wc["rpc"]["tunnel_port"], wc["lent"]
        with pytest.raises(rpc.RpcError):
            rpc.probe(lan.hosts["wc"][1], lent["worker_port"], 2)
        with pytest.raises(rpc.RpcError):
            rpc.probe(lan.hosts["wc"][1], tunnel, 2)

        # A worker dies mid-stream: the stream ends with an error; the next request re-plans.
        with clients("two") as client:
            stream = client.chat.completions.create(model=MODEL_ID, messages=PROMPT,
                                                    max_tokens=400, stream=True)
            with pytest.raises(openai.APIError):
                for i, _ in enumerate(stream):
                    if i == 2:
                        killed = time.monotonic()
                        os.kill(lent["pid"], signal.SIGKILL)
            print(f"worker killed: the stream ended {time.monotonic() - killed:.2f} s later")
        again, _ = ask("two")
        assert again == two
    finally:
        swarm.close()

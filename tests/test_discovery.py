"""Discovery and pinned identities across real hosts (network namespaces on a bridge).

Nodes announce themselves by mDNS; the gateway shows them, and only the policy decides: a node
listed by id is routed to at the address discovery found, once its certificate has that id.
Rogue hosts -- one announcing a listed name with its own certificate, one announcing a listed
node's id -- are shown with the reason, recorded in the audit log, and never sent a request.
While nodes die or lose their link, requests in flight end with an error, never a hang, and
the next ones go to a node that is up."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from myco.identity import Identity, load_or_create
from myco.tls import client_context
from nodeagent import pairing
from tests import netns
from tests.conftest import MODEL_ID
from tests.procs import Proc, myco, run_myco, wait_for

why_not = netns.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=why_not or "")
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Count to twenty."}]}


@pytest.fixture
def lan() -> Iterator[netns.Lan]:
    with netns.Lan() as lan:
        yield lan


def node_state(tmp_path: Path, name: str, gateway: Identity) -> tuple[Path, str]:
    """A node's state directory, paired with `gateway`, and the node's id."""
    state = tmp_path / name
    pairing.add(state, gateway.id, gateway.pem(), "test gateway")
    return state, load_or_create(state, name).id


class Swarm:
    """A gateway on host `gw` of `lan`, and the node processes the test starts."""

    def __init__(self, lan: netns.Lan, tmp_path: Path, policy: str, models: Path) -> None:
        self.lan, self.tmp, self.models = lan, tmp_path, models
        self.identity = load_or_create(tmp_path / "gateway", "gateway")
        self.tls = client_context(self.identity)
        self.policy = tmp_path / "policy.toml"
        self.policy.write_text(policy)
        self.audit = tmp_path / "audit.jsonl"
        self.procs: list[Proc] = []
        address = lan.hosts["gw"][1]
        self.gateway = self.start(
            "gw", "gateway", "--policy", str(self.policy), "--host", address, "--port", "8787",
            "--discover", address, "--audit-log", str(self.audit),
            "--state-dir", str(tmp_path / "gateway"))

    def start(self, host: str, *args: str) -> Proc:
        proc = myco(*args, prefix=self.lan.prefix(host))
        self.procs.append(proc)
        return proc

    def node(self, host: str, name: str, state: Path) -> Proc:
        return self.start(host, "node", "--host", self.lan.hosts[host][1], "--port", "8788",
                          "--name", name, "--models", str(self.models), "--n-ctx", "512",
                          "--state-dir", str(state))

    def discovered(self) -> dict[str, dict[str, Any]]:
        """What the gateway discovered, by address."""
        swarm = httpx.get(self.gateway.url + "/v1/swarm", timeout=2).json()
        return {a: d for d in swarm["discovered"] for a in d["addresses"]}

    def dry_run(self) -> dict[str, Any]:
        return httpx.post(self.gateway.url + "/v1/policy/dry-run", json={"model": MODEL_ID},
                          timeout=2).json()

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


def test_discovery_shows_pins_and_the_policy_decides(lan: netns.Lan, models_dir: Path,
                                                     tmp_path: Path) -> None:
    lan.host("gw")
    n1_addr, spoof_addr = lan.host("n1"), lan.host("spoof")
    rogue_addr, stranger_addr = lan.host("rogue"), lan.host("stranger")
    gateway = load_or_create(tmp_path / "gateway", "gateway")
    n1_state, n1_id = node_state(tmp_path, "n1", gateway)
    rogue_state, rogue_id = node_state(tmp_path, "rogue", gateway)
    # n1 is listed by id alone: its address comes from discovery.
    swarm = Swarm(lan, tmp_path, f'[nodes.n1]\nid = "{n1_id}"\n\n'
                  '[[routes]]\nmatch = { model = "*" }\nforward = ["n1"]\n', models_dir)
    try:
        first = swarm.dry_run()
        assert first["status"] == 503, first  # listed, not discovered yet
        n1 = swarm.node("n1", "n1", n1_state)
        listened = time.monotonic()
        found = wait_for(lambda: swarm.discovered().get(n1_addr), 10, "n1 discovered")
        print(f"n1 discovered {(time.monotonic() - listened) * 1000:.0f} ms after it listened")
        assert found["status"] == "listed" and found["listed_as"] == "n1"
        assert found["addresses"] == [n1_addr] and found["port"] == 8788
        wait_for(lambda: swarm.dry_run()["allowed"], 5, "n1 eligible")

        # A real node announcing the listed name with its own certificate (paired with the
        # gateway, even), and a host announcing n1's id with its own certificate.
        rogue = swarm.node("rogue", "n1", rogue_state)
        spoof = Proc([*lan.prefix("spoof"), sys.executable, "-m", "tests.rogue", "--host",
                      spoof_addr, "--name", "n1-spoof", "--claim-id", n1_id, "--state",
                      str(tmp_path / "spoof"), "--trust", gateway.cert_path])
        swarm.procs.append(spoof)
        imposter = wait_for(lambda: swarm.discovered().get(rogue_addr), 10, "rogue discovered")
        assert imposter["id"] == rogue_id
        assert imposter["status"].startswith("identity mismatch")
        assert imposter["listed_as"] is None

        def rejected() -> dict[str, str]:
            return {c["target"]: c["reason"] for c in swarm.dry_run()["candidates"]
                    if c["kind"] == "discovered"}

        spoofed = wait_for(lambda: rejected().get(f"n1-spoof ({n1_id})"), 10, "spoof rejected")
        assert spoofed.startswith("identity mismatch: announces the id of 'n1'")

        swarm.node("stranger", "mini", tmp_path / "s")
        stranger_id = load_or_create(tmp_path / "s", "mini").id
        wait_for(lambda: swarm.discovered().get(stranger_addr), 10, "stranger discovered")
        text = run_myco("nodes", "--gateway", swarm.gateway.url).stdout
        assert "identity mismatch" in text and rogue_id in text and stranger_id in text

        # The dry-run shows all three as candidates it rejected, and why.
        dry = swarm.dry_run()
        reasons = rejected()
        assert reasons[f"n1 ({rogue_id})"].startswith("identity mismatch")
        assert reasons[f"mini ({stranger_id})"] == "not in policy"
        assert dry["target"] == "n1"
        audit = swarm.audit.read_text()
        assert rogue_id in audit and stranger_id in audit and "n1-spoof" in audit

        # Pairing: `myco policy allow` appends the node, leaving the file as it was above it.
        before = swarm.policy.read_text()
        allowed = run_myco("policy", "allow", "mini", "--policy", str(swarm.policy),
                           "--gateway", swarm.gateway.url)
        assert allowed.returncode == 0, allowed.stderr
        after = swarm.policy.read_text()
        assert after.startswith(before.rstrip("\n")) and f'id = "{stranger_id}"' in after
        assert run_myco("policy", "check", str(swarm.policy)).returncode == 0
        again = run_myco("policy", "allow", n1_id, "--policy", str(swarm.policy),
                         "--gateway", swarm.gateway.url)
        assert "already in the policy" in again.stdout, (again.stderr, swarm.discovered())
        assert swarm.policy.read_text() == after

        # Routing follows the policy and the certificates only.
        for _ in range(3):
            response = httpx.post(swarm.gateway.url + "/v1/chat/completions", timeout=120,
                                  json={**CHAT, "max_tokens": 2})
            assert response.status_code == 200 and response.headers["x-myco-node"] == "n1"
        info = httpx.get(n1.url + "/node/info", verify=swarm.tls).json()
        assert info["loaded"] == [MODEL_ID]
        assert httpx.get(rogue.url + "/node/info", verify=swarm.tls).json()["loaded"] == []
        assert "rogue: request" not in spoof.output, spoof.output

        # A clean stop says goodbye: gone at once, not after a TTL.
        assert n1.stop() == 0, n1.output
        stopped = time.monotonic()
        wait_for(lambda: n1_addr not in swarm.discovered(), 5, "n1 gone from discovery")
        print(f"n1 gone {(time.monotonic() - stopped) * 1000:.0f} ms after it stopped")
        assert not swarm.dry_run()["allowed"]
    finally:
        swarm.close()
    assert "rogue: request" not in spoof.output, spoof.output


def test_an_unpaired_gateway_is_refused_by_the_node(lan: netns.Lan, models_dir: Path,
                                                    tmp_path: Path) -> None:
    lan.host("gw")
    lan.host("n1")
    other = load_or_create(tmp_path / "other-gateway", "another gateway")
    n1_state, n1_id = node_state(tmp_path, "n1", other)  # paired with another gateway only
    swarm = Swarm(lan, tmp_path, f'[nodes.n1]\nid = "{n1_id}"\n\n'
                  '[[routes]]\nmatch = { model = "*" }\nforward = ["n1"]\n', models_dir)
    try:
        swarm.node("n1", "n1", n1_state)

        def refused() -> str:
            nodes = httpx.get(swarm.gateway.url + "/v1/swarm", timeout=2).json()["nodes"]
            return str(nodes[0]["reason"]) if "refused" in nodes[0]["reason"] else ""

        reason = wait_for(refused, 10, "the node's refusal reported")
        assert "myco node allow" in reason
        # Pairing on the node takes effect while it runs.
        pairing.add(n1_state, swarm.identity.id, swarm.identity.pem(), "now")
        wait_for(lambda: swarm.dry_run()["allowed"], 10, "n1 eligible once paired")
    finally:
        swarm.close()


def test_requests_in_flight_to_a_dying_node_end_and_the_swarm_goes_on(
        lan: netns.Lan, models_dir: Path, tmp_path: Path) -> None:
    lan.host("gw")
    lan.host("n1")
    lan.host("n2")
    gateway = load_or_create(tmp_path / "gateway", "gateway")
    (s1, id1), (s2, id2) = node_state(tmp_path, "n1", gateway), node_state(tmp_path, "n2",
                                                                          gateway)
    swarm = Swarm(lan, tmp_path, f'[nodes.n1]\nid = "{id1}"\n[nodes.n2]\nid = "{id2}"\n\n'
                  '[[routes]]\nmatch = { model = "*" }\nforward = ["n1", "n2"]\n', models_dir)
    client = openai.OpenAI(base_url=swarm.gateway.url + "/v1", api_key="x", max_retries=0,
                           timeout=60)

    def ask() -> str:
        raw = client.chat.completions.with_raw_response.create(**CHAT, max_tokens=2)
        return str(raw.headers["x-myco-node"])

    def stream_then(cut: Callable[[], None]) -> float:
        """Start a long stream, `cut` after the first chunks; seconds until it ended."""
        stream = client.chat.completions.create(**CHAT, max_tokens=400, stream=True)
        cut_at = time.monotonic()
        with pytest.raises(openai.APIError, match=r"failed mid-stream|unhealthy"):
            for i, _ in enumerate(stream):
                if i == 2:
                    cut_at = time.monotonic()
                    cut()
        return time.monotonic() - cut_at

    try:
        n1 = swarm.node("n1", "n1", s1)
        swarm.node("n2", "n2", s2)
        wait_for(lambda: swarm.dry_run()["candidates"][1]["eligible"], 15, "n2 eligible")
        assert ask() == "n1"

        # The node process dies (its runner with it): the stream ends at once, with an error.
        took = stream_then(lambda: os.killpg(n1.popen.pid, signal.SIGKILL))
        print(f"kill -9: the stream ended {took * 1000:.0f} ms later")
        assert ask() == "n2"

        # It comes back: discovered, checked, routed to again.
        n1 = swarm.node("n1", "n1", s1)
        wait_for(lambda: swarm.dry_run()["target"] == "n1", 15, "n1 back as the target")
        assert ask() == "n1"

        # Its link goes down: no reset ever arrives, the health check ends the stream.
        took = stream_then(lambda: lan.link("n1", up=False))
        print(f"link down: the stream ended {took * 1000:.0f} ms later")
        assert took < 5
        assert ask() == "n2"
    finally:
        client.close()
        swarm.close()

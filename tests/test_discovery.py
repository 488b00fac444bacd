"""Discovery across real hosts (network namespaces on a bridge): nodes announce themselves by
mDNS; the gateway shows them; only the policy decides what is routed to, and a node that
announces a listed name with another certificate is shown as an identity mismatch."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import netns
from tests.conftest import MODEL_ID
from tests.procs import Proc, myco, run_myco

why_not = netns.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=why_not or "")


@pytest.fixture
def lan() -> Iterator[netns.Lan]:
    with netns.Lan() as lan:
        yield lan


def node_id(state: Path) -> str:
    result = run_myco("node", "id", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def wait_for(check: Callable[[], Any], timeout: float) -> tuple[Any, float]:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        value = check()
        if value:
            return value, time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


def test_discovery_shows_and_the_policy_decides(lan: netns.Lan, models_dir: Path,
                                                tmp_path: Path) -> None:
    gw_addr, n1_addr, rogue_addr = lan.host("gw"), lan.host("n1"), lan.host("rogue")
    stranger_addr = lan.host("stranger")
    n1_state, rogue_state = tmp_path / "n1", tmp_path / "rogue"
    n1_id = node_id(n1_state)
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[nodes.n1]\naddress = "{n1_addr}:8788"\nid = "{n1_id}"\n\n'
                      '[[routes]]\nmatch = { model = "*" }\nforward = ["n1"]\n')
    procs: list[Proc] = []
    try:
        gateway = myco("gateway", "--policy", str(policy), "--host", gw_addr, "--port", "8787",
                       "--discover", gw_addr, "--audit-log", str(tmp_path / "audit.jsonl"),
                       prefix=lan.prefix("gw"))
        procs.append(gateway)

        def discovered() -> dict[str, dict[str, Any]]:
            swarm = httpx.get(gateway.url + "/v1/swarm", timeout=2).json()
            return {d["id"]: d for d in swarm["discovered"]}

        n1 = myco("node", "--host", n1_addr, "--port", "8788", "--name", "n1", "--models",
                  str(models_dir), "--state-dir", str(n1_state), prefix=lan.prefix("n1"))
        procs.append(n1)
        found, took = wait_for(lambda: discovered().get(n1_id), 10)
        print(f"n1 discovered {took * 1000:.0f} ms after it listened")
        assert found["status"] == "listed" and found["listed_as"] == "n1"
        assert found["addresses"] == [n1_addr] and found["port"] == 8788

        rogue = myco("node", "--host", rogue_addr, "--port", "8788", "--name", "n1",
                     "--models", str(models_dir), "--state-dir", str(rogue_state),
                     prefix=lan.prefix("rogue"))
        procs.append(rogue)
        rogue_id = node_id(rogue_state)
        imposter, _ = wait_for(lambda: discovered().get(rogue_id), 10)
        assert imposter["status"].startswith("identity mismatch")
        assert imposter["listed_as"] is None

        text = run_myco("nodes", "--gateway", gateway.url).stdout
        assert "identity mismatch" in text and rogue_id in text

        stranger = myco("node", "--host", stranger_addr, "--port", "8788", "--name", "mini",
                        "--models", str(models_dir), "--state-dir", str(tmp_path / "s"),
                        prefix=lan.prefix("stranger"))
        procs.append(stranger)
        stranger_id = node_id(tmp_path / "s")
        wait_for(lambda: discovered().get(stranger_id), 10)

        # The dry-run shows both as candidates it rejected, and why.
        dry = httpx.post(gateway.url + "/v1/policy/dry-run", json={"model": MODEL_ID}).json()
        rejected = {c["target"]: c["reason"] for c in dry["candidates"]
                    if c["kind"] == "discovered"}
        assert rejected[f"n1 ({rogue_id})"].startswith("identity mismatch")
        assert rejected[f"mini ({stranger_id})"] == "not in policy"
        assert dry["target"] == "n1"
        audit = (tmp_path / "audit.jsonl").read_text()
        assert rogue_id in audit and stranger_id in audit and '"endpoint":"discovery"' in audit

        # Pairing: `myco policy allow` appends the node, leaving the file as it was above it.
        before = policy.read_text()
        allowed = run_myco("policy", "allow", "mini", "--policy", str(policy), "--gateway",
                           gateway.url)
        assert allowed.returncode == 0, allowed.stderr
        after = policy.read_text()
        assert after.startswith(before.rstrip("\n")) and f'id = "{stranger_id}"' in after
        assert run_myco("policy", "check", str(policy)).returncode == 0
        again = run_myco("policy", "allow", n1_id, "--policy", str(policy), "--gateway",
                         gateway.url)
        assert "already in the policy" in again.stdout and policy.read_text() == after

        # Routing follows the policy only: the request loads the model on n1, not the rogue.
        response = httpx.post(gateway.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL_ID, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200 and response.headers["x-myco-node"] == "n1"
        assert httpx.get(n1.url + "/node/info").json()["loaded"] == [MODEL_ID]
        assert httpx.get(rogue.url + "/node/info").json()["loaded"] == []

        # A clean stop says goodbye: gone at once, not after a TTL.
        assert n1.stop() == 0, n1.output
        _, gone = wait_for(lambda: n1_id not in discovered(), 5)
        print(f"n1 gone {gone * 1000:.0f} ms after it stopped")
    finally:
        for proc in procs:
            proc.stop()

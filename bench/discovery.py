"""Discovery timings across real hosts (network namespaces; needs root).

`python -m bench.discovery [--starts N]` puts a gateway and a node on separate hosts on a
bridge and measures, over N starts of the node:

- from the node printing "listening" to the gateway showing it discovered (mDNS), and to the
  gateway's dry-run routing to it (its certificate checked against the id the policy lists it
  by, over mutual TLS, health-checked and serving the model);
- from `kill -9` of the node to the gateway marking it unhealthy, and the same for the
  node's link going down.

Targets: routable p50 <= 250 ms, unhealthy <= 3 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from myco.identity import load_or_create
from nodeagent import pairing
from tests import netns
from tests.procs import Proc, myco

MODEL = "gemma-3-270m-q4_k_m"


def until(check: Callable[[], bool], timeout: float = 15) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.005)
    raise TimeoutError("not within the limit")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--models", default=os.environ.get("MYCO_MODELS"))
    args = parser.parse_args()
    why = netns.available()
    if why:
        raise SystemExit(f"bench.discovery: {why}")
    from nodeagent.store import default_models_dir

    models = args.models or str(default_models_dir())
    with tempfile.TemporaryDirectory() as tmp, netns.Lan() as lan:
        gw_addr, n1_addr = lan.host("gw"), lan.host("n1")
        state = Path(tmp) / "n1"
        identity = load_or_create(Path(tmp) / "gateway", "bench gateway")
        pairing.add(state, identity.id, identity.pem(), "bench gateway")
        node_id = load_or_create(state, "n1").id
        policy = Path(tmp) / "policy.toml"
        # Listed by id alone: the address comes from discovery, checked against the id.
        policy.write_text(f'[nodes.n1]\nid = "{node_id}"\n[[routes]]\nforward = ["n1"]\n')
        gateway = myco("gateway", "--policy", str(policy), "--host", gw_addr, "--discover",
                       gw_addr, "--audit-log", str(Path(tmp) / "audit.jsonl"),
                       "--state-dir", str(Path(tmp) / "gateway"), prefix=lan.prefix("gw"))
        client = httpx.Client(base_url=gateway.url, timeout=2)

        def discovered() -> bool:
            found = client.get("/v1/swarm").json()["discovered"]
            return any(d["id"] == node_id for d in found)

        def start() -> Proc:
            return myco("node", "--host", n1_addr, "--port", "8788", "--name", "n1",
                        "--models", models, "--state-dir", str(state), prefix=lan.prefix("n1"))

        def routable() -> bool:
            return bool(client.post("/v1/policy/dry-run", json={"model": MODEL}).json()
                        ["allowed"])

        def unhealthy() -> bool:
            return not client.get("/health").json()["nodes"]["n1"]

        seen, ready, killed, unplugged, spawned = [], [], [], [], []
        try:
            for i in range(args.starts):
                spawn = time.monotonic()
                node = start()
                started = time.monotonic()
                until(discovered)
                seen.append(time.monotonic() - started)
                until(routable)
                ready.append(time.monotonic() - started)
                spawned.append(time.monotonic() - spawn)
                if i % 2 == 0:
                    os.kill(node.popen.pid, signal.SIGKILL)
                    killed.append(until(unhealthy))
                else:
                    lan.link("n1", up=False)
                    unplugged.append(until(unhealthy))
                    lan.link("n1", up=True)
                    lan.restore_route("n1")
                node.stop()
                # A killed or cut-off node leaves its mDNS record behind (TTL 120 s): start it
                # once more and stop it cleanly, so the next start is discovered afresh.
                again = start()
                until(routable)
                again.stop()
                until(lambda: not discovered() and not routable())
        finally:
            client.close()
            gateway.stop()

    def row(name: str, values: list[float], target: str) -> str:
        return (f"{name:<34} p50 {pct(values, 50) * 1000:7.0f} ms   p99 "
                f"{pct(values, 99) * 1000:7.0f} ms   max {max(values) * 1000:6.0f} ms   "
                f"(n={len(values)}; target {target})")

    print(f"discovery across network namespaces, {args.starts} node starts "
          f"(mean discovered {statistics.mean(seen) * 1000:.0f} ms)")
    print(row("listening -> discovered (mDNS)", seen, "-"))
    print(row("listening -> routable", ready, "p50 <= 250 ms"))
    print(row("process spawn -> routable", spawned, "- (Python start-up included)"))
    print(row("kill -9 -> unhealthy", killed, "<= 3 s"))
    print(row("link down -> unhealthy", unplugged, "<= 3 s"))


if __name__ == "__main__":
    main()

"""`myco up` as a user runs it, ended the ways a user or a service manager ends it: its gateway
and node stop with it, a second one says what already runs, and the gateway pins the node.

Each test runs `myco up` on free ports with its state in a temporary directory; the node's
state dir is not the default one, so only what `myco up` tells the gateway pins the node."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from myco.tls import certificate_id
from tests.conftest import MODEL_ID
from tests.procs import ROOT, Proc, run_myco, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # `myco up` and its children


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Up:
    """`myco up` on free ports, with its state under `tmp` and models from `models`."""

    def __init__(self, tmp: Path, models: Path) -> None:
        self.port, self.node_port = free_port(), free_port()
        self.policy = tmp / "policy.toml"
        self.policy.write_text((ROOT / "policies/default.toml").read_text()
                               .replace("127.0.0.1:8788", f"127.0.0.1:{self.node_port}"))
        self.node_state = tmp / "node-state"
        self.env = {"MYCO_MODELS": str(models), "XDG_STATE_HOME": str(tmp / "state"),
                    "MYCO_NODE_STATE_DIR": str(self.node_state)}
        self.proc = Proc([sys.executable, "-m", "mycoswarm.cli", *self.args()], env=self.env,
                         ready=r"export OPENAI_BASE_URL=(\S+)/v1")
        self.url = self.proc.url
        self.children = psutil.Process(self.proc.popen.pid).children()

    def args(self, port: int = 0, node_port: int = 0) -> list[str]:
        return ["up", "--policy", str(self.policy), "--port", str(port or self.port),
                "--node-port", str(node_port or self.node_port)]

    def end(self, sig: int, timeout: float = 30) -> int:
        """Send `sig` to `myco up`; its exit status."""
        os.kill(self.proc.popen.pid, sig)
        return self.proc.popen.wait(timeout)

    def close(self) -> str:
        """Kill what is left (children first: they hold the output pipe); all output."""
        for child in self.children:
            if _alive(child):
                child.kill()
        self.proc.stop(signal.SIGKILL)
        return self.proc.output

    def wait_stopped(self, timeout: float = 20) -> None:
        """Until both children exited and both ports are free again."""
        wait_for(lambda: not any(_alive(p) for p in self.children) and not _listening(self.port)
                 and not _listening(self.node_port), timeout, "the gateway and node stopped")


def _alive(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    started = Up(tmp_path, tmp_path / "no-models")
    yield started
    started.close()


def test_a_killed_up_takes_its_gateway_and_node_along(up: Up) -> None:
    assert sorted(" ".join(p.cmdline()[3:4]) for p in up.children) == ["gateway", "node"]
    node_id = certificate_id((up.node_state / "cert.pem").read_text())
    (local,) = httpx.get(f"{up.url}/v1/swarm", timeout=10).json()["nodes"]
    assert (local["id"], local["healthy"]) == (node_id, True)  # pinned: MYCO_GATEWAY_LOCAL_NODE_ID

    again = run_myco(*up.args(), env=up.env)
    assert again.returncode == 1
    assert f"myco: a mycoSwarm gateway is already running at {up.url}; stop it, or choose " \
           "another port with --port" in again.stderr, again.stderr
    beside = run_myco(*up.args(port=free_port()), env=up.env)
    assert beside.returncode == 1
    assert f"a mycoSwarm node is already running at https://127.0.0.1:{up.node_port}" \
           in beside.stderr, beside.stderr
    assert "Traceback" not in again.stderr + beside.stderr

    up.end(signal.SIGKILL)  # nothing of `myco up` runs to clean up
    up.wait_stopped()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_sigterm_and_sighup_stop_the_gateway_and_node(up: Up, sig: signal.Signals) -> None:
    assert up.end(sig) == 0
    up.wait_stopped(timeout=1)
    output = up.close()
    assert "myco: stopping" in output and "Traceback" not in output


def test_ctrl_c_stops_both_and_the_base_url_serves_the_model(tmp_path: Path,
                                                             models_dir: Path) -> None:
    started = Up(tmp_path, models_dir)
    assert started.proc.ready_line == f"  export OPENAI_BASE_URL={started.url}/v1\n"
    models = httpx.get(f"{started.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL_ID]
    try:
        assert started.end(signal.SIGINT) == 0
        started.wait_stopped(timeout=1)
    finally:
        output = started.close()
    assert "myco: stopping" in output and "Traceback" not in output
    for url in (started.url, f"https://127.0.0.1:{started.node_port}"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2, verify=False)

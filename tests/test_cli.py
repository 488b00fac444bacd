"""The `myco` command as a user types it."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL_ID
from tests.procs import ROOT, Proc, run_myco

COMMANDS = [["up"], ["gateway"], ["node"], ["nodes"], ["policy", "check"],
            ["policy", "explain"], ["hw"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help(command: list[str]) -> None:
    result = run_myco(*command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: myco " + " ".join(command))


def test_nodes_shows_what_the_gateway_sees(gateway: Proc) -> None:
    result = run_myco("nodes", "--gateway", gateway.url)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^local\s+127\.0\.0\.1:\d+\s+healthy", result.stdout, re.M)
    assert MODEL_ID in result.stdout


def test_policy_explain_asks_the_gateway(gateway: Proc) -> None:
    result = run_myco("policy", "explain", "--model", MODEL_ID, "--gateway", gateway.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "ALLOWED: forward to local"
    assert "-> local (node): first eligible target of the route" in result.stdout
    missing = run_myco("policy", "explain", "--model", "nope", "--json", "--gateway",
                       gateway.url)
    decision = json.loads(missing.stdout)
    assert (decision["allowed"], decision["status"]) == (False, 404)


def test_hw_reports_this_machine(models_dir: Path) -> None:
    result = run_myco("hw", "--models", str(models_dir), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["hardware"]["cpu_cores"] >= 1
    assert report["capabilities"]["models"][0]["model"] == MODEL_ID
    text = run_myco("hw", "--models", str(models_dir)).stdout
    assert f"{MODEL_ID}: " in text and "role: " in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_up_prints_the_base_url_and_ctrl_c_stops_both(tmp_path: Path, models_dir: Path) -> None:
    port, node_port = _free_port(), _free_port()
    policy = tmp_path / "policy.toml"
    policy.write_text((ROOT / "policies/default.toml").read_text()
                      .replace("127.0.0.1:8788", f"127.0.0.1:{node_port}"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "myco.cli", "up", "--policy", str(policy), "--port", str(port),
         "--node-port", str(node_port)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={"MYCO_MODELS": str(models_dir),
                                                  "XDG_STATE_HOME": str(tmp_path / "state"),
                                                  "PATH": "/usr/bin:/bin"})
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "export OPENAI_BASE_URL" in line or not line:
            break
    assert f"  export OPENAI_BASE_URL=http://127.0.0.1:{port}/v1\n" in lines, "".join(lines)
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL_ID]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0
    rest = proc.stdout.read()
    proc.stdout.close()
    assert "myco: stopping" in rest
    assert "Traceback" not in rest
    for url in (f"http://127.0.0.1:{port}", f"https://127.0.0.1:{node_port}"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2, verify=False)

"""The `myco` command as a user types it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import MODEL_ID
from tests.procs import Proc, run_myco, run_myco_here

COMMANDS = [["up"], ["gateway"], ["node"], ["nodes"], ["policy", "check"],
            ["policy", "explain"], ["hw"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help(command: list[str]) -> None:
    result = run_myco_here(*command, "--help")
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

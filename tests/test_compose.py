"""compose/: no Docker engine runs here, so check what can be checked without one: every
service runs a valid `myco` command, every policy it mounts passes `myco policy check`, and
everything the Dockerfile copies exists."""

from __future__ import annotations

import re

import pytest
import yaml

from mycoswarm.cli import parser
from tests.procs import ROOT, run_myco_here

COMPOSE = ROOT / "compose"
SERVICES = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_command_is_a_valid_myco_invocation(name: str) -> None:
    command = SERVICES[name]["command"]
    assert command[0] == "myco"
    args = parser().parse_args(command[1:])  # argparse exits on anything invalid
    assert args.command in ("gateway", "node")


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_mounted_policies_pass_check(name: str) -> None:
    service = SERVICES[name]
    command = service["command"]
    if "--policy" not in command:
        return
    inside = command[command.index("--policy") + 1]
    mounts = dict(reversed(v.split(":")[:2]) for v in service.get("volumes", []))
    assert inside in mounts, f"{name} uses {inside} but mounts no file there"
    result = run_myco_here("policy", "check", str(COMPOSE / mounts[inside]))
    assert result.returncode == 0, result.stderr


def test_dockerfile_copies_only_what_exists() -> None:
    text = (COMPOSE / "Dockerfile").read_text()
    sources = [s for line in re.findall(r"^COPY (.+)$", text, re.M) for s in line.split()[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source

"""The gateway installs and runs without llama-cpp-python (a Raspberry Pi can coordinate)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.procs import ROOT


def test_inference_dependencies_are_the_node_extra_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    assert "llama" not in core and "gemma" not in core
    assert any(d.startswith("llama-cpp-python") for d in project["optional-dependencies"]["node"])


def test_gateway_serves_with_llama_cpp_unimportable(tmp_path: Path) -> None:
    script = f"""
import sys
sys.modules["llama_cpp"] = None  # any import of it now fails
sys.argv = ["myco", "policy", "check", "{ROOT / 'policies/default.toml'}"]
from mycoswarm.cli import main
main()
from gateway.app import create_app
from gateway.policy import load
from gateway.settings import GatewaySettings
from myco.identity import load_or_create
from pathlib import Path
settings = GatewaySettings("{ROOT / 'policies/default.toml'}", audit_path="{tmp_path / 'a.jsonl'}")
create_app(settings, load(settings.policy_path), load_or_create(Path("{tmp_path}"), "gw"))
print("gateway built")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "gateway built" in result.stdout
    assert "llama_cpp" not in result.stderr

"""The README's examples run, against a real gateway and node (litestar's docs-examples idea)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.procs import ROOT, Proc, run_myco_here

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCKS if lang == language]


def localize(text: str, gateway: Proc) -> str:
    """Point the README's 127.0.0.1:8787 at the test gateway, and `.venv/bin/myco` at ours."""
    text = text.replace("http://127.0.0.1:8787", gateway.url)
    return text.replace(".venv/bin/myco", f"{sys.executable} -m mycoswarm.cli")


def test_first_screen_shows_the_two_commands() -> None:
    first = "\n".join(README.splitlines()[:12])
    assert "make up" in first and "make test" in first


def test_policy_example_passes_check(tmp_path: object) -> None:
    (toml,) = blocks("toml")
    path = ROOT / ".pytest-readme-policy.toml"
    path.write_text(toml)
    try:
        result = run_myco_here("policy", "check", str(path))
    finally:
        path.unlink()
    assert result.returncode == 0, result.stderr


def test_python_example(gateway: Proc) -> None:
    (code,) = blocks("python")
    env = {**os.environ, "OPENAI_BASE_URL": gateway.url + "/v1", "OPENAI_API_KEY": "local"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize("index", range(len(blocks("sh"))))
def test_shell_examples(gateway: Proc, index: int) -> None:
    script = localize(blocks("sh")[index], gateway)
    if "make " in script:
        pytest.skip("the make commands are what runs this suite")
    env = {**os.environ, "MYCO_GATEWAY_URL": gateway.url}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            assert "error" not in json.loads(line), line

"""Shared fixtures: one real node agent with the real model per session, gateways on demand."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.procs import Proc, myco

MODEL_ID = "gemma-3-270m-q4_k_m"


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, assembled once (reusing the copy `make` put in the model dir)."""
    from nodeagent.default_model import assemble
    from nodeagent.store import default_models_dir

    existing = default_models_dir() / f"{MODEL_ID}.gguf"
    if existing.exists():
        return existing
    return assemble(tmp_path_factory.mktemp("assembled"), progress=False)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Path:
    directory = tmp_path_factory.mktemp("models")
    (directory / model_file.name).symlink_to(model_file)
    return directory


@pytest.fixture(scope="session")
def node(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = myco("node", "--port", "0", "--models", str(models_dir), "--name", "testnode",
                "--n-ctx", "1024", "--state-dir", str(tmp_path_factory.mktemp("node-state")))
    yield proc
    proc.stop()


PolicyFactory = Callable[..., Proc]


@pytest.fixture(scope="session")
def start_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyFactory]:
    """start_gateway(policy_text, env=None) -> a running gateway with that policy."""
    procs: list[Proc] = []

    def start(policy: str, env: dict[str, str] | None = None) -> Proc:
        directory = tmp_path_factory.mktemp("gateway")
        path = directory / "policy.toml"
        path.write_text(policy)
        proc = myco("gateway", "--policy", str(path), "--port", "0",
                    "--audit-log", str(directory / "audit.jsonl"), env=env)
        proc.audit_path = directory / "audit.jsonl"  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def node_policy(address: str, name: str = "local") -> str:
    return f'[nodes.{name}]\naddress = "{address}"\n\n[[routes]]\nmatch = {{ model = "*" }}\n' \
           f'forward = ["{name}"]\n'


@pytest.fixture(scope="session")
def gateway(node: Proc, start_gateway: PolicyFactory) -> Proc:
    """A gateway with the default policy's shape, in front of the session's real node."""
    return start_gateway(node_policy(node.address))

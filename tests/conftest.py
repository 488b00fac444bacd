"""Shared fixtures: one real node agent with the real model per session, gateways on demand.

Every gateway of the session has one identity (`gateway_identity`), and the session's node is
paired with it, as `myco node allow` would; `node_tls` is what a test uses to talk to a node
directly, as that gateway."""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from myco.identity import Identity, load_or_create
from myco.tls import client_context
from nodeagent import pairing
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
def gateway_identity(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return load_or_create(tmp_path_factory.mktemp("gateway-state"), "test gateway")


@pytest.fixture(scope="session")
def node_tls(gateway_identity: Identity) -> ssl.SSLContext:
    return client_context(gateway_identity)


def paired_state(tmp_path_factory: pytest.TempPathFactory, gateway: Identity) -> Path:
    """A node state directory that serves `gateway`."""
    state = tmp_path_factory.mktemp("node-state")
    pairing.add(state, gateway.id, gateway.pem(), "test gateway")
    return state


@pytest.fixture(scope="session")
def node(models_dir: Path, tmp_path_factory: pytest.TempPathFactory,
         gateway_identity: Identity) -> Iterator[Proc]:
    proc = myco("node", "--port", "0", "--models", str(models_dir), "--name", "testnode",
                "--n-ctx", "1024", "--state-dir",
                str(paired_state(tmp_path_factory, gateway_identity)))
    yield proc
    proc.stop()


PolicyFactory = Callable[..., Proc]


@pytest.fixture(scope="session")
def start_gateway(tmp_path_factory: pytest.TempPathFactory,
                  gateway_identity: Identity) -> Iterator[PolicyFactory]:
    """start_gateway(policy_text, env=None) -> a running gateway with that policy."""
    procs: list[Proc] = []

    def start(policy: str, env: dict[str, str] | None = None) -> Proc:
        directory = tmp_path_factory.mktemp("gateway")
        path = directory / "policy.toml"
        path.write_text(policy)
        proc = myco("gateway", "--policy", str(path), "--port", "0",
                    "--audit-log", str(directory / "audit.jsonl"),
                    "--state-dir", str(Path(gateway_identity.cert_path).parent), env=env)
        proc.audit_path = directory / "audit.jsonl"  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def node_id(proc: Proc) -> str:
    """The id a `myco node` process logged at start (`node NAME (id ID): ...`)."""
    found = re.search(r"\(id ([A-Z2-7-]+)\)", proc.output)
    assert found, proc.output
    return found.group(1)


def node_policy(address: str, name: str = "local", pin: str | None = None) -> str:
    """One node, every model to it; pinned to `pin` (None: unpinned, as on loopback)."""
    pinned = f'id = "{pin}"\n' if pin else ""
    return f'[nodes.{name}]\naddress = "{address}"\n{pinned}\n[[routes]]\n' \
           f'match = {{ model = "*" }}\nforward = ["{name}"]\n'


@pytest.fixture(scope="session")
def gateway(node: Proc, start_gateway: PolicyFactory) -> Proc:
    """A gateway with the default policy's shape, in front of the session's real node."""
    return start_gateway(node_policy(node.address, pin=node_id(node)))


# The fast tier (`make test-fast`): everything that needs neither the model nor network
# namespaces.  A test is slow when it uses one of these fixtures (directly or through another)
# or says so with @pytest.mark.slow; the mark is derived here so it cannot drift.
SLOW_FIXTURES = frozenset({"node", "gateway", "model_file", "models_dir", "model_path", "lan"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

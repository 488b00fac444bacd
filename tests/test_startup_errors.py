"""Startup mistakes stop `myco` with one line naming the variable or file and the reason, exit
status 2, no traceback; the files `myco` writes (policy, pairing) keep what the person wrote."""

from __future__ import annotations

import json
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gateway import toml_lines
from gateway.policy import PolicyError, parse
from myco.identity import Identity, load_or_create
from nodeagent import pairing
from tests.procs import run_myco

# Each case starts a real `myco` process (about 0.6 s each): not in the fast tier.
pytestmark = pytest.mark.slow

POLICY = """\
# My swarm: comments, blank lines and order are mine.
[nodes.local]   # this machine
address = "127.0.0.1:8788"

[[routes]]   # everything goes home
match = { model = "*" }
forward = ["local"]
"""


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory with an identity, and a model directory with nothing in it."""
    directory = tmp_path_factory.mktemp("state")
    load_or_create(directory, "test")
    (directory / "models").mkdir()
    (directory / "policy.toml").write_text(POLICY)
    return directory


def mistake(tmp: Path, state: Path, case: str) -> tuple[list[str], dict[str, str], str]:
    """`myco` arguments, environment and the one line it must print for each kind of mistake."""
    node = ["node", "--port", "0", "--models", str(state / "models")]
    broken = tmp / "broken"
    if case in ("cert.pem", "key.pem", "gateways.toml"):
        broken.mkdir()
        for name in ("cert.pem", "key.pem"):
            (broken / name).write_bytes((state / name).read_bytes())
        (broken / case).write_text('["not an id"]\nname = "x"\n' if case == "gateways.toml"
                                   else "-----BEGIN garbage\n")
    if case == "another key":
        broken.mkdir()
        (broken / "cert.pem").write_bytes((state / "cert.pem").read_bytes())
        load_or_create(tmp / "other", "other")
        (broken / "key.pem").write_bytes((tmp / "other" / "key.pem").read_bytes())
    if case == "models.toml":
        broken.mkdir()
        (broken / "models.toml").write_text("[aliases\n")
    policy = tmp / "policy.toml"
    policy.write_text(POLICY.replace('address = "127.0.0.1:8788"',
                                     'address = "127.0.0.1:8788"\nid = "ABC-DEF"'))
    gateway = ["gateway", "--port", "0", "--state-dir", str(state), "--policy"]
    return {
        "variable": (["gateway"], {"MYCO_GATEWAY_PORT": "abc"},
                     "myco: MYCO_GATEWAY_PORT: 'abc': Expected `int`, got `str`"),
        "node variable": ([*node, "--state-dir", str(state)], {"MYCO_NODE_THREADS": "many"},
                          "myco: MYCO_NODE_THREADS: 'many': Expected `int | null`, got `str`"),
        "id variable": ([*gateway, str(state / "policy.toml")],
                        {"MYCO_GATEWAY_LOCAL_NODE_ID": "nope"},
                        "myco: MYCO_GATEWAY_LOCAL_NODE_ID: 'nope' is not a mycoSwarm id (8 groups "
                        "of 7 base32 characters)"),
        "flag": ([*gateway, str(state / "policy.toml"), "--port", "65536"], {},
                 "myco: --port: 65536: Expected `int` <= 65535"),
        "size flag": ([*node, "--state-dir", str(state), "--memory-limit", "3X"], {},
                      "myco: --memory-limit: memory limit '3X': give bytes, or a number with "
                      "K, M, G or T (300M)"),
        "policy": ([*gateway, str(policy)], {},
                   f"myco: {policy}:4: nodes.local.id: 'ABC-DEF' is not a mycoSwarm id "
                   "(8 groups of 7 base32 characters)"),
        "missing policy": ([*gateway, str(tmp / "absent.toml")], {},
                           f"myco: {tmp / 'absent.toml'}: cannot read policy: "
                           "No such file or directory"),
        "up's policy": (["up", "--policy", str(policy)], {},
                        f"myco: {policy}:4: nodes.local.id: 'ABC-DEF' is not a mycoSwarm id "
                        "(8 groups of 7 base32 characters)"),
        "models.toml": (["node", "--port", "0", "--state-dir", str(state), "--models",
                         str(broken)], {},
                        f"myco: {broken / 'models.toml'}: Expected ']' at the end of a table "
                        "declaration (at line 1, column 9)"),
        "cert.pem": (["gateway", "id", "--state-dir", str(broken)], {},
                     f"myco: {broken / 'cert.pem'}: not a PEM certificate (move cert.pem and "
                     "key.pem away for a new identity, a new id: pair it again)"),
        "key.pem": (["node", "id", "--state-dir", str(broken)], {},
                    f"myco: {broken / 'key.pem'}: not the PEM private key of cert.pem, with no "
                    "passphrase (move cert.pem and key.pem away for a new identity, a new id: "
                    "pair it again)"),
        "another key": (["gateway", "id", "--state-dir", str(broken)], {},
                        f"myco: {broken / 'key.pem'}: not the PEM private key of cert.pem, "
                        "with no passphrase (move cert.pem and key.pem away for a new "
                        "identity, a new id: pair it again)"),
        "gateways.toml": ([*node, "--state-dir", str(broken)], {},
                          f"myco: {broken / 'gateways.toml'}: ['not an id'] needs "
                          "certificate = '''PEM'''"),
    }[case]


@pytest.mark.parametrize("case", [
    "variable", "node variable", "id variable", "flag", "size flag", "policy", "missing policy",
    "up's policy", "models.toml", "cert.pem", "key.pem", "another key", "gateways.toml"])
def test_a_startup_mistake_is_one_line(tmp_path: Path, state: Path, case: str) -> None:
    args, env, line = mistake(tmp_path, state, case)
    result = run_myco(*args, env=env, timeout=30)
    assert (result.returncode, result.stderr) == (2, line + "\n"), result.stderr
    assert result.stdout == ""


# --- the files `myco` writes ------------------------------------------------------------------


@pytest.fixture
def gateway_api() -> Iterator[tuple[str, list[dict[str, object]]]]:
    """A stand-in gateway answering GET /v1/swarm with the `discovered` list the test fills."""
    discovered: list[dict[str, object]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"nodes": [], "discovered": discovered}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", discovered
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", ["pi.lan", 'say "hi"', "back\\slash", "plain"])
def test_policy_allow_keeps_the_file_and_quotes_the_name(
        tmp_path: Path, gateway_identity: Identity, name: str,
        gateway_api: tuple[str, list[dict[str, object]]]) -> None:
    url, discovered = gateway_api
    discovered.append({"name": name, "id": gateway_identity.id, "status": "not in policy",
                       "addresses": ["192.168.1.5"], "port": 8788})
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    result = run_myco("policy", "allow", name, "--policy", str(policy), "--gateway", url)
    assert result.returncode == 0, result.stderr
    after = policy.read_text()
    assert after.startswith(POLICY + "\n"), after  # the person's lines, comments, order
    added = parse(after, "p.toml")
    assert added.nodes[name].id == gateway_identity.id
    assert added.nodes[name].address == "192.168.1.5:8788"
    assert added.routes[0].line == 5  # line numbers of what was there are unchanged
    header = POLICY.count("\n") + 2  # after one blank line
    assert after.splitlines()[header - 1].endswith("] # added by `myco policy allow`")
    assert toml_lines.line_of(toml_lines.index_lines(after), ("nodes", name, "id")) == header + 2
    # A mistake in the added table is reported at its line, the quoted key understood.
    with pytest.raises(PolicyError) as caught:
        parse(after.replace(f'id = "{gateway_identity.id}"', 'id = "ABC-DEF"'), "p.toml")
    assert caught.value.line == header + 2, str(caught.value)

    again = run_myco("policy", "allow", name, "--policy", str(policy), "--gateway", url)
    assert (again.returncode, again.stderr) == (
        2, f"myco: {policy}: not added: it lists {name!r} already; pass --name\n")
    assert policy.read_text() == after


@pytest.mark.parametrize("name", ["gateway on pi.lan", 'say "hi" \\ bye', "line\nbreak"])
def test_pairing_keeps_the_file_and_round_trips_the_name(
        tmp_path: Path, gateway_identity: Identity, name: str) -> None:
    other = load_or_create(tmp_path / "other", "other")
    mine = "# Edited by hand: my own note stays.\n"
    (tmp_path / pairing.FILE).write_text(mine)
    assert pairing.add(tmp_path, gateway_identity.id, gateway_identity.pem(), name)
    assert pairing.add(tmp_path, other.id, other.pem(), "second")
    assert not pairing.add(tmp_path, other.id, other.pem(), "second")
    text = (tmp_path / pairing.FILE).read_text()
    assert text.startswith(mine)
    stored = tomllib.loads(text)
    assert stored[gateway_identity.id]["name"] == name
    assert pairing.load(tmp_path) == {gateway_identity.id: gateway_identity.pem(),
                                      other.id: other.pem()}
    assert text.count("BEGIN CERTIFICATE") == 2

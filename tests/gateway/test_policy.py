"""Policy files: every mistake stops with file, line and reason; the shipped policies are valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy import PolicyError, load, parse
from myco.identity import id_of
from tests.procs import ROOT, run_myco, run_myco_here

GOOD = """\
[nodes.ws]
address = "127.0.0.1:9001"

[upstreams.lan]
url = "http://127.0.0.1:9002/v1"
cloud = false

[[routes]]
match = { model = "llama-*", endpoint = ["chat", "completions"], tools = false }
forward = ["ws", "lan"]

[[routes]]
match = { model = "*" }
deny = "not here"
"""


def test_good_policy_parses_in_order() -> None:
    policy = parse(GOOD, "good.toml")
    assert [r.index for r in policy.routes] == [0, 1]
    assert policy.routes[0].forward == ("ws", "lan")
    assert policy.routes[0].line == 8
    assert policy.routes[0].text == "model=llama-* endpoint=chat|completions tools=false " \
                                    "-> forward ws, lan"
    assert policy.routes[1].deny == "not here"
    assert sorted(policy.addresses()) == [("127.0.0.1", 9001), ("127.0.0.1", 9002)]


@pytest.mark.parametrize(("text", "line", "reason"), [
    (GOOD.replace('forward = ["ws", "lan"]', 'forward = ["ws", "gpu"]'), 10,
     "routes[0].forward: 'gpu' is not a listed node or upstream"),
    (GOOD.replace("cloud = false\n", ""), 4, "upstreams.lan: missing required key `cloud`"),
    (GOOD.replace('address = "127.0.0.1:9001"', 'address = "ws-no-port"'), 2,
     "nodes.ws.address: address 'ws-no-port' must be host:port"),
    (GOOD.replace('deny = "not here"', 'deny = "x"\nforward = ["ws"]'), 12,
     "routes[1]: give exactly one of `forward` or `deny`"),
    (GOOD.replace("tools = false", "tool = false"), 9, "routes[0].match: unknown key `tool`"),
    (GOOD.replace('"chat", "completions"', '"chat", "images"'), 9,
     "routes[0].match.endpoint[1]: Invalid enum value 'images'"),
    (GOOD.replace('[[routes]]\nmatch = { model = "*" }', '[[routes]\nmatch = { model = "*" }'),
     12, "not valid TOML"),
    (GOOD.replace("cloud = false", "cloud = false\ncolour = 1"), 7,
     "upstreams.lan: unknown key `colour`"),
    (GOOD.replace('url = "http://127.0.0.1:9002/v1"', 'url = "ftp://x/v1"'), 5,
     "upstreams.lan.url: 'ftp://x/v1' must be an http(s) URL"),
    ('[nodes.a]\naddress = "127.0.0.1:1"\n', None, "no [[routes]]"),
    (GOOD.replace('address = "127.0.0.1:9001"', 'address = "10.0.0.2:9001"'), 2,
     "nodes.ws: `id` is required for a node off this machine"),
    (GOOD.replace('address = "127.0.0.1:9001"', 'colour = "red"'), 2,
     "nodes.ws: unknown key `colour`"),
    (GOOD.replace('address = "127.0.0.1:9001"', ''), 1,
     "nodes.ws: give `id` (what `myco node id` prints on that machine), `address`, or both"),
    (GOOD.replace('address = "127.0.0.1:9001"', 'address = "127.0.0.1:9001"\nid = "ABC-DEF"'),
     3, "nodes.ws.id: 'ABC-DEF' is not a mycoSwarm id"),
    # Quoted keys, as `myco policy allow` writes for host names with dots.
    (GOOD.replace('[nodes.ws]\naddress = "127.0.0.1:9001"',
                  '[nodes."pi.lan"]\naddress = "127.0.0.1:9001"\nid = "ABC-DEF"')
         .replace('"ws", "lan"', '"pi.lan", "lan"'),
     3, "nodes.pi.lan.id: 'ABC-DEF' is not a mycoSwarm id"),
])
def test_mistakes_name_file_line_and_reason(text: str, line: int | None, reason: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse(text, "p.toml")
    assert caught.value.file == "p.toml"
    assert caught.value.line == line, str(caught.value)
    assert reason in caught.value.reason


def test_a_node_may_be_listed_by_id_alone() -> None:
    node_id = id_of(b"a certificate")
    policy = parse(GOOD.replace('address = "127.0.0.1:9001"', f'id = "{node_id}"'), "p.toml")
    assert (policy.nodes["ws"].address, policy.nodes["ws"].id) == (None, node_id)
    assert policy.addresses() == [("127.0.0.1", 9002)]  # the node's comes from discovery


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        load(tmp_path / "absent.toml")


@pytest.mark.parametrize("path", sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "policies").rglob("*.toml")))
def test_shipped_policies_pass_check(path: str) -> None:
    result = run_myco_here("policy", "check", path)
    assert result.returncode == 0, result.stderr
    assert "ok (" in result.stdout


def test_check_refuses_unlisted_target_with_exit_status(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('forward = ["ws", "lan"]', 'forward = ["ws", "10.9.9.9:80"]'))
    result = run_myco_here("policy", "check", str(bad))
    assert result.returncode == 2
    assert f"{bad}:10: routes[0].forward: '10.9.9.9:80' is not a listed node or upstream" \
        in result.stderr


def test_gateway_refuses_to_start_with_a_bad_policy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[routes]]\nforward = ['nobody']\n")
    result = run_myco("gateway", "--policy", str(bad), "--port", "0")
    assert result.returncode == 2
    assert f"{bad}:2: routes[0].forward: 'nobody' is not a listed node or upstream" \
        in result.stderr

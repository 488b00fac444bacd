"""Whether a discovered node is the one the policy lists: pure."""

from __future__ import annotations

from gateway.discovery import Discovered, judge
from gateway.policy import parse
from myco.identity import id_of

LISTED, OTHER = id_of(b"listed certificate"), id_of(b"another certificate")
POLICY = parse(f'[nodes.ws]\naddress = "10.0.0.2:8788"\nid = "{LISTED}"\n'
               '[nodes.mini]\naddress = "10.0.0.3:8788"\n'
               '[[routes]]\nforward = ["ws"]\n')


def found(name: str, node_id: str) -> Discovered:
    return Discovered(name, node_id, ("10.0.0.9",), 8788, {}, 0.0)


def test_judge() -> None:
    assert judge(found("ws", LISTED), POLICY) == ("ws", "listed")
    assert judge(found("renamed", LISTED), POLICY) == ("ws", "listed")  # the id decides
    assert judge(found("ws", OTHER), POLICY) == \
        (None, f"identity mismatch: 'ws' is pinned to {LISTED}")
    assert judge(found("mini", OTHER), POLICY) == (None, "not in policy")  # no id pinned
    assert judge(found("stranger", OTHER), POLICY) == (None, "not in policy")

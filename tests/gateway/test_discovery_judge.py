"""Whether a discovered node is the one the policy lists: pure."""

from __future__ import annotations

from gateway.discovery import Discovered, judge
from gateway.policy import parse
from myco.identity import id_of

LISTED, LAB, OTHER = (id_of(b"listed certificate"), id_of(b"lab certificate"),
                      id_of(b"another certificate"))
POLICY = parse(f'[nodes.ws]\naddress = "10.0.0.2:8788"\nid = "{LISTED}"\n'
               f'[nodes.lab]\nid = "{LAB}"\n'
               '[nodes.mini]\naddress = "127.0.0.1:8788"\n'
               '[[routes]]\nforward = ["ws"]\n')


def found(name: str, node_id: str, address: str = "10.0.0.2") -> Discovered:
    return Discovered(f"{name}._myco._tcp.local.", name, node_id, (address,), 8788, {}, 0.0)


def test_judge() -> None:
    assert judge(found("ws", LISTED), POLICY) == ("ws", "listed")
    assert judge(found("renamed", LISTED), POLICY) == ("ws", "listed")  # the id decides
    assert judge(found("ws", OTHER), POLICY) == \
        (None, f"identity mismatch: 'ws' is pinned to {LISTED}")
    assert judge(found("mini", OTHER), POLICY) == (None, "not in policy")  # no id pinned
    assert judge(found("stranger", OTHER), POLICY) == (None, "not in policy")
    # An announcement only claims an id: one from another address than the policy's is not
    # the node; for a node listed by id alone, the certificate is checked on connecting.
    assert judge(found("ws", LISTED, "10.0.0.9"), POLICY) == (None, (
        "identity mismatch: claims the id of 'ws', which the policy places at 10.0.0.2:8788"))
    assert judge(found("anything", LAB, "10.0.0.9"), POLICY) == ("lab", "listed")

"""`resolve` with a route that may split a model: pure, table-driven.  The split is planned only
when no forward target can hold the model alone, over the route's healthy split nodes."""

from __future__ import annotations

import pytest

from gateway.policy import parse
from gateway.resolve import NodeView, RoutingRequest, resolve
from myco.protocol import Device, ModelShape

MiB = 1024**2
MODEL = "big"
SHAPE = ModelShape(18, 4 * MiB, MiB // 2, 170 * MiB, 170 * MiB, 513 * MiB)
POLICY = parse("""
[nodes.head]
address = "127.0.0.1:1"
[nodes.w1]
address = "127.0.0.1:2"
[nodes.w2]
address = "127.0.0.1:3"
[[routes]]
match = { model = "*" }
forward = ["head"]
split = ["head", "w1", "w2"]
""", "split.toml")


def view(name: str, lends_mib: int, *, serves: bool = False, stores: bool = False,
         healthy: bool = True) -> NodeView:
    return NodeView(name, healthy, frozenset({MODEL}) if serves else frozenset(),
                    "" if healthy else "health check failed", frozenset({MODEL} if stores else ()),
                    {MODEL: SHAPE} if stores else {}, (7, 0, 0),
                    (Device("cpu", "CPU", lends_mib * MiB),))


def decide(*views: NodeView) -> tuple[int, str | None, tuple[str, ...], str]:
    decision = resolve(RoutingRequest("chat", MODEL), POLICY, {v.name: v for v in views})
    workers = decision.plan.workers if decision.plan else ()
    return decision.status, decision.target, workers, decision.message


@pytest.mark.parametrize(("views", "status", "target", "workers"), [
    # The head holds the model whole: forwarded, no split.
    ((view("head", 4000, serves=True, stores=True), view("w1", 900), view("w2", 900)),
     200, "head", ()),
    # It does not fit on the head: one worker is enough, so one worker it is.
    # (The output layer's device also holds the 513 MiB logits buffer: about 940 MiB.)
    ((view("head", 600, stores=True), view("w1", 1000), view("w2", 1000)),
     200, "head", ("w1",)),
    # Neither worker is enough alone (w1 for the output, w2 for the layers): both.
    ((view("head", 430, stores=True), view("w1", 960), view("w2", 400)),
     200, "head", ("w2", "w1")),
    # An unhealthy worker takes no part.
    ((view("head", 600, stores=True), view("w1", 1000, healthy=False), view("w2", 1000)),
     200, "head", ("w2",)),
])
def test_split_when_no_target_holds_the_model(views: tuple[NodeView, ...], status: int,
                                              target: str, workers: tuple[str, ...]) -> None:
    assert decide(*views)[:3] == (status, target, workers)


def test_no_placement_is_a_503_with_the_planners_reasons() -> None:
    status, target, _, message = decide(view("head", 300, stores=True), view("w1", 100),
                                        view("w2", 100, healthy=False))
    assert (status, target) == (503, None)
    assert "no placement for the model" in message
    assert "w1:" in message and "w2: unhealthy" in message


def test_nothing_to_split_when_no_split_node_holds_the_model() -> None:
    status, _, _, message = decide(view("head", 4000), view("w1", 900), view("w2", 900))
    assert status == 404 and "is not served" in message

"""`resolve(request, policy, swarm) -> Decision`: where a request goes, and why.

Pure: no I/O, clock or globals.  The real endpoints and the dry-run endpoint both call it, so
they cannot disagree.  The rules, in order:

1. The first route whose `match` fits the request decides; none fits -> 403 (default deny).
2. A `deny` route -> 403 naming the route.
3. Each target of a `forward` route, in the order written, is a candidate: a node must be
   healthy and serve the model; an upstream must list the model (when it lists models at all).
   Model names are compared as `policy.model_key` gives them (NFKC, case folded, stripped).
4. The eligible candidates are tried in turn while no byte of an answer has reached the
   client: in the order written, those with a free slot first (spill-over), or, when the
   route says `balance = "least-busy"`, the least busy first (`Load`: what the nodes report
   and what the gateway has in flight; a target that asked to be left alone with Retry-After
   goes last).
5. None is eligible and the route names `split` nodes: `place` (gateway/placement.py) plans
   the model over the healthy ones; the plan's head is the target, or the planner's reasons
   are a 503.
6. No candidate serves the model -> 404; some would but cannot now -> 503 with the reasons.

A destination is only ever a target the policy listed, never derived from the model name.
Messages show at most `SHOWN` characters of a model name (it is the client's input).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec

from gateway.placement import Plan, SplitNode, place
from gateway.policy import EndpointKind, Policy, Route, matches, model_key
from myco.protocol import Device, ModelShape, RpcVersion

SHOWN = 256


def quoted(model: str) -> str:
    """`model` quoted for a message or log: cut at `SHOWN` characters, with its length."""
    return repr(model) if len(model) <= SHOWN else f"{model[:SHOWN]!r}... ({len(model)} characters)"


class RoutingRequest(msgspec.Struct, frozen=True):
    endpoint: EndpointKind
    model: str
    client: str | None = None
    has_tools: bool = False


class Load(msgspec.Struct, frozen=True):
    busy: int  # requests for this model running or queued there, as far as the gateway knows
    slots: int  # requests it decodes at once; 0: not known (an upstream)
    backing_off: bool = False  # it answered 429 or 503 with a Retry-After not yet over

    @property
    def free(self) -> bool:
        return not self.backing_off and (self.slots == 0 or self.busy < self.slots)

    def text(self) -> str:
        busy = f"{self.busy}/{self.slots} slots busy" if self.slots else f"{self.busy} in flight"
        return busy + ", backing off" * self.backing_off


class NodeView(msgspec.Struct, frozen=True):
    """What the gateway currently knows of one listed node."""

    name: str
    healthy: bool
    models: frozenset[str] | None = None  # what it serves whole; None: not known yet
    reason: str = ""  # why it is unhealthy
    # For split inference: the models in its store (whether they fit or not), their shapes
    # at its context, the RPC protocol it speaks and the memory it lends.
    stored: frozenset[str] = frozenset()
    shapes: dict[str, ModelShape] = {}
    rpc: RpcVersion | None = None
    lends: tuple[Device, ...] = ()
    slots: int = 0  # per loaded model
    pending: dict[str, int] = {}  # model_key(model) -> requests running or waiting there


Swarm = Mapping[str, NodeView]


class Candidate(msgspec.Struct, frozen=True):
    target: str
    kind: Literal["node", "upstream", "discovered"]
    eligible: bool
    chosen: bool
    reason: str
    load: Load | None = None


class Decision(msgspec.Struct, frozen=True):
    allowed: bool
    status: int  # 200 when allowed, else the HTTP status of the refusal
    message: str
    rule_index: int | None = None
    rule: str | None = None
    target: str | None = None
    candidates: tuple[Candidate, ...] = ()
    plan: Plan | None = None  # a split: `target` is its head
    order: tuple[str, ...] = ()  # the eligible targets, in the order they are tried

    @property
    def rule_name(self) -> str:
        return f"routes[{self.rule_index}]" if self.rule_index is not None else "none"

    @property
    def eligible(self) -> tuple[str, ...]:
        """Targets to try, in order: the chosen one, then the fallbacks (a split: its head)."""
        return (self.plan.head,) if self.plan is not None else self.order


def order(targets: Sequence[str], loads: Mapping[str, Load], balance: str) -> tuple[str, ...]:
    """`targets` in the order to try them (stable: the order written breaks ties)."""
    def key(target: str) -> tuple[bool, float]:
        load = loads.get(target, Load(0, 0))
        if balance == "least-busy":
            return load.backing_off, load.busy / max(load.slots, 1)
        return not load.free, 0
    return tuple(sorted(targets, key=key))


def resolve(request: RoutingRequest, policy: Policy, swarm: Swarm,
            strangers: Sequence[tuple[str, str]] = (),
            loads: Mapping[str, Load] = {}) -> Decision:
    """`strangers`: (label, why) of nodes discovery found that the policy does not list;
    they are shown as rejected candidates and never chosen."""
    decision = _resolve(request, policy, swarm, loads)
    if not strangers:
        return decision
    shown = tuple(Candidate(label, "discovered", False, False, why) for label, why in strangers)
    return msgspec.structs.replace(decision, candidates=decision.candidates + shown)


def _resolve(request: RoutingRequest, policy: Policy, swarm: Swarm,
             loads: Mapping[str, Load]) -> Decision:
    key = model_key(request.model)
    route = next((r for r in policy.routes
                  if matches(r.match, request.endpoint, key, request.client,
                             request.has_tools)), None)
    if route is None:
        return Decision(False, 403, f"no route in policy {policy.source} matches this request "
                        f"(model {quoted(request.model)}, endpoint {request.endpoint}); "
                        "anything the policy does not list is denied")
    index, rule = route.index, route.text
    if route.deny is not None:
        return Decision(False, 403, f"denied by policy rule {route.name}: {route.deny}", index,
                        rule)

    problems: dict[str, str | None] = {}
    serves_model = False
    for target in route.forward:
        problems[target], knows_model = _check(target, key, policy, swarm)
        serves_model = serves_model or knows_model
    tried = order([t for t, p in problems.items() if p is None], loads, route.balance)
    candidates = []
    for target, problem in problems.items():
        kind: Literal["node", "upstream"] = "node" if target in policy.nodes else "upstream"
        load = loads.get(target)
        if problem is not None:
            reason = problem
        elif target != tried[0]:
            reason = f"eligible fallback #{tried.index(target)}"
        elif route.balance == "least-busy":
            reason = "the least busy eligible target"
        elif next(t for t in route.forward if problems[t] is None) != target:
            reason = "the first eligible target with a free slot (those before it are busy)"
        else:
            reason = "first eligible target of the route"
        if problem is None and load is not None:
            reason += f" ({load.text()})"
        candidates.append(Candidate(target, kind, problem is None,
                                    bool(tried) and tried[0] == target, reason, load))

    shown = tuple(candidates)
    if tried:
        return Decision(True, 200, f"forward to {tried[0]}", index, rule, tried[0], shown,
                        order=tried)
    why = "; ".join(f"{c.target}: {c.reason}" for c in shown)
    if route.split:
        split = _split(route, request.model, swarm)
        if split is not None:
            if isinstance(split, Plan):
                return Decision(True, 200, f"split: {split.reason}, head {split.head}", index,
                                rule, split.head, shown, split)
            return Decision(False, 503, f"no target of {route.name} can hold model "
                            f"{quoted(request.model)} alone ({why}), and {split}", index, rule,
                            None, shown)
    if not serves_model:
        return Decision(False, 404, f"model {quoted(request.model)} is not served by any "
                        f"target of {route.name} ({why})", index, rule, None, shown)
    return Decision(False, 503, f"no available target for {route.name}: {why}", index, rule,
                    None, shown)


def _check(target: str, key: str, policy: Policy, swarm: Swarm) -> tuple[str | None, bool]:
    """(why `target` cannot take the request or None, whether it may serve the model whose
    `model_key` is `key`)."""
    if target in policy.upstreams:
        listed = policy.upstreams[target].models
        if listed is not None and key not in {model_key(m) for m in listed}:
            return "upstream does not list this model", False
        return None, True
    view = swarm.get(target)
    if view is None:
        return "not seen yet", True
    if view.models is not None and key not in {model_key(m) for m in view.models}:
        if not view.healthy:
            return f"unhealthy ({view.reason}) and does not serve this model", False
        return "does not serve this model", False
    if not view.healthy:
        return f"unhealthy: {view.reason}", True
    return None, True


def _split(route: Route, model: str, swarm: Swarm) -> Plan | str | None:
    """A plan over the route's healthy split nodes, why there is none, or None when none of
    them holds the model (nothing to split)."""
    views = [v for n in route.split if (v := swarm.get(n)) is not None]
    shape = next((v.shapes[model] for v in views if v.healthy and model in v.shapes), None)
    if shape is None:
        return None
    down = [f"{v.name}: unhealthy ({v.reason})" for v in views if not v.healthy]
    members = [SplitNode(v.name, model in v.stored, v.rpc, v.lends) for v in views if v.healthy]
    found = place(shape, members)
    return found if isinstance(found, Plan) else "; ".join([found.message, *down])

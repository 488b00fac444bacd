"""`place(shape, nodes) -> Plan | Refusal`: which nodes run one model together, and how.

Pure: no I/O, clock or globals.  `nodes` are those a policy route allows to take part in a
split.  The rules, in order:

Who may take part (`HEAD_RULES`, `WORKER_RULES`: the first that fails is the node's reason):
1. The head holds the GGUF file (workers receive the weights over RPC from the head).
2. A head with workers speaks RPC.
3. A worker speaks RPC, the very version of the head (ggml itself accepts an older minor
   version, but the patch number tracks ggml's operation table: one build per split).
4. A worker lends some memory.

Which plan wins (`PREFERENCES`, compared in order):
5. No split: a node that holds the model and fits it alone (its CPU, its own GPUs) wins.
6. Fewer hops: fewer workers (each costs a network round trip per token).
7. Faster devices: more layers on GPUs.
8. More free memory on the devices that hold layers.
9. Tie-break by node names: the head, then the workers.

How a plan is laid out (llama.cpp's rules; see myco/layers.py):
- Devices in llama.cpp's order: the head's CPU, the worker devices (RPC0, RPC1, ... in
  registration order: slowest first, so the fastest holds the output layer), the head's GPUs.
- The head's CPU holds the token embedding and the first layers; the last device that gets
  layers holds the output layer and the logits buffer (`ModelShape.logits_bytes`).
- Layers go to GPUs first (most free memory first), then the head's CPU, then worker CPUs.
- Every device that gets layers must fit their weights and KV cache, plus `compute_bytes`.

How to add a rule: a membership rule is a `_Rule` in `HEAD_RULES` or `WORKER_RULES`, in order
of priority; a preference is a `_Preference` in `PREFERENCES` above the first one it should
outweigh.  Then add a case to tests/gateway/test_placement.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

from myco.layers import layer_split
from myco.protocol import COMPUTE_BYTES, Device, DeviceKind, MiB, ModelShape, RpcVersion

MAX_WORKERS = 16  # GGML_RPC_MAX_SERVERS


class SplitNode(msgspec.Struct, frozen=True):
    name: str
    has_model: bool  # holds the GGUF file: only such a node can be the head
    rpc_version: RpcVersion | None  # None: no RPC in its llama.cpp build
    # A worker: one rpc worker per device.  A head: its CPU and every local GPU in llama.cpp's
    # order (free_bytes 0 when not lent), since llama.cpp lists them all after the RPC devices.
    devices: tuple[Device, ...]


class PlacedDevice(msgspec.Struct, frozen=True):
    node: str
    device: str
    kind: DeviceKind
    role: Literal["head", "worker"]
    first: int  # first unit: layers 0..n_layers-1, then the output layer as unit n_layers
    count: int  # units held (0: a head GPU left out; it stays in tensor_split)
    holds_output: bool
    need_bytes: int
    free_bytes: int


class Plan(msgspec.Struct, frozen=True):
    head: str
    devices: tuple[PlacedDevice, ...]  # llama.cpp's order, the head's CPU first
    workers: tuple[str, ...]  # worker nodes, in registration order
    n_gpu_layers: int
    tensor_split: tuple[float, ...]
    reason: str


class NodeReason(msgspec.Struct, frozen=True):
    node: str
    reason: str


class Refusal(msgspec.Struct, frozen=True):
    message: str
    reasons: tuple[NodeReason, ...]


class _Rule(msgspec.Struct, frozen=True):
    name: str
    fails: Callable[[SplitNode, SplitNode], str | None]  # (node, head) -> why it cannot


def _v(version: RpcVersion | None) -> str:
    return ".".join(map(str, version)) if version else "none"


HEAD_RULES: tuple[_Rule, ...] = (
    _Rule("holds the model", lambda n, _: None if n.has_model
          else "does not hold the model file, so cannot be the head"),
)
WORKER_RULES: tuple[_Rule, ...] = (
    _Rule("head speaks RPC", lambda n, h: None if h.rpc_version
          else f"head {h.name} speaks no RPC"),
    _Rule("speaks RPC", lambda n, h: None if n.rpc_version else "speaks no RPC"),
    _Rule("same version", lambda n, h: None if n.rpc_version == h.rpc_version
          else f"speaks RPC {_v(n.rpc_version)}, head {h.name} speaks {_v(h.rpc_version)}"),
    _Rule("lends memory", lambda n, h: None if any(d.free_bytes > 0 for d in n.devices)
          else "lends no memory"),
)


class _Preference(msgspec.Struct, frozen=True):
    name: str
    key: Callable[[Plan], object]  # smaller wins


PREFERENCES: tuple[_Preference, ...] = (
    _Preference("fewer hops", lambda p: len(p.workers)),
    _Preference("more layers on GPUs", lambda p: -sum(d.count for d in p.devices
                                                      if d.kind == "gpu")),
    _Preference("more free memory", lambda p: -sum(d.free_bytes for d in p.devices if d.count)),
    _Preference("node names", lambda p: (p.head, p.workers)),
)


def _failing(rules: Sequence[_Rule], node: SplitNode, head: SplitNode) -> str | None:
    return next((why for rule in rules if (why := rule.fails(node, head))), None)


def _size(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n / MiB:.0f} MiB"


def place(shape: ModelShape, nodes: Sequence[SplitNode], *,
          compute_bytes: int = COMPUTE_BYTES) -> Plan | Refusal:
    """The best plan by `PREFERENCES`, or a Refusal naming every node and why it did not help."""
    nodes = sorted(nodes, key=lambda n: n.name)
    heads = [n for n in nodes if _failing(HEAD_RULES, n, n) is None]
    crew = {h.name: [n for n in nodes if n is not h and _failing(WORKER_RULES, n, h) is None]
            for h in heads}
    need = _total(shape, compute_bytes)
    heads = [h for h in heads if sum(d.free_bytes for n in (h, *crew[h.name])
                                     for d in n.devices) >= need]  # cannot fit: skip early
    for k in range(min(max((len(crew[h.name]) for h in heads), default=0), MAX_WORKERS) + 1):
        found = [plan for head in heads for workers in itertools.combinations(crew[head.name], k)
                 if isinstance(plan := _layout(shape, head, workers, compute_bytes), Plan)]
        if found:
            return min(found, key=lambda p: tuple(rule.key(p) for rule in PREFERENCES))
    return _refuse(shape, nodes, crew, compute_bytes)


def _layout(shape: ModelShape, head: SplitNode, workers: Sequence[SplitNode],
            compute: int) -> Plan | None:
    """Head CPU first, then the worker devices (slowest first), then the head's GPUs."""
    cpu = next((d for d in head.devices if d.kind == "cpu"), Device("cpu", "CPU", 0))
    remote = sorted(((w, d) for w in workers for d in w.devices if d.free_bytes > 0),
                    key=lambda wd: (wd[1].kind == "gpu", wd[1].free_bytes, wd[0].name))
    offload = [*remote, *((head, d) for d in head.devices if d.kind == "gpu")]
    per = max(shape.layer_bytes + shape.kv_bytes_per_layer, 1)
    tail = shape.output_bytes + shape.logits_bytes
    # The output goes with the last device that gets layers: the last one that can hold it.
    holder = next((i for i in reversed(range(len(offload)))
                   if offload[i][1].free_bytes >= compute + tail), None)
    rooms = {-1: cpu.free_bytes - compute - shape.input_bytes - (tail if holder is None else 0)}
    if rooms[-1] < 0:
        return None  # the head's CPU cannot even hold the token embedding
    for i in range(-1 if holder is None else holder + 1):
        rooms[i] = offload[i][1].free_bytes - compute - (tail if i == holder else 0)

    def rank(i: int) -> tuple[int, int, str, str]:
        if i < 0:
            return 1, 0, "", ""
        node, dev = offload[i]
        return (0 if dev.kind == "gpu" else 2), -dev.free_bytes, node.name, dev.name

    counts, left = dict.fromkeys(range(-1, len(offload)), 0), shape.n_layers
    for i in sorted(rooms, key=rank):
        counts[i] = take = min(max(rooms[i], 0) // per, left)
        left -= take
    if left:
        return None
    if holder is not None:
        counts[holder] += 1  # the output unit
    return _plan(shape, head, cpu, offload, counts, holder, compute)


def _plan(shape: ModelShape, head: SplitNode, cpu: Device,
          offload: Sequence[tuple[SplitNode, Device]], counts: dict[int, int],
          holder: int | None, compute: int) -> Plan:
    kept = [i for i, (node, dev) in enumerate(offload) if counts[i] or node is head]
    tail = shape.output_bytes + shape.logits_bytes
    per = shape.layer_bytes + shape.kv_bytes_per_layer
    cpu_units = counts[-1] + (1 if holder is None else 0)
    placed = [PlacedDevice(head.name, cpu.name, "cpu", "head", 0, cpu_units, holder is None,
                           shape.input_bytes + counts[-1] * per + compute
                           + (tail if holder is None else 0), cpu.free_bytes)]
    first = cpu_units
    for i in kept:
        node, dev = offload[i]
        n = counts[i]
        layers = n - (1 if i == holder else 0)
        need = layers * per + (tail if i == holder else 0) + (compute if n else 0)
        placed.append(PlacedDevice(node.name, dev.name, dev.kind,
                                   "head" if node is head else "worker", first, n,
                                   i == holder, need, dev.free_bytes))
        first += n
    n_gpu_layers, tensor_split = layer_split([cpu_units, *(counts[i] for i in kept)])
    workers = tuple(dict.fromkeys(p.node for p in placed if p.role == "worker"))
    reason = (f"split over {len(workers)} worker(s): {', '.join(workers)}" if workers
              else f"no split: {head.name} holds the model and fits it")
    return Plan(head.name, tuple(placed), workers, n_gpu_layers, tensor_split, reason)


def _total(shape: ModelShape, compute: int) -> int:
    """What the model needs at the least, on one device."""
    return (shape.input_bytes + shape.n_layers * (shape.layer_bytes + shape.kv_bytes_per_layer)
            + shape.output_bytes + shape.logits_bytes + compute)


def _refuse(shape: ModelShape, nodes: Sequence[SplitNode], crew: dict[str, list[SplitNode]],
            compute: int) -> Refusal:
    need = _total(shape, compute)
    heads = [n for n in nodes if n.name in crew]
    reasons = []
    for node in nodes:
        lends = sum(d.free_bytes for d in node.devices)
        if node in heads:
            helpers = crew[node.name]
            total = lends + sum(d.free_bytes for w in helpers for d in w.devices)
            with_them = (f" nor with workers {', '.join(w.name for w in helpers)} "
                         f"({_size(total)} in all)" if helpers else ", and no worker can join it")
            why = [f"as head: does not fit alone ({_size(lends)} lent){with_them}"]
        else:
            why = [_failing(HEAD_RULES, node, node) or ""]
        if heads:
            as_worker = {_failing(WORKER_RULES, node, h) for h in heads if h is not node}
            if None in as_worker:
                why.append(f"as worker: its {_size(lends)} are not enough with the others")
            else:
                why += sorted(w for w in as_worker if w)
        reasons.append(NodeReason(node.name, "; ".join(why)))
    listed = "; ".join(f"{r.node}: {r.reason}" for r in reasons) or "no nodes may take part"
    return Refusal(f"no placement for the model (about {_size(need)} in all): {listed}",
                   tuple(reasons))

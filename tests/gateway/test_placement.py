"""The split planner, table-driven over small swarms (pure: no processes)."""

from __future__ import annotations

import pytest

from gateway.placement import Plan, Refusal, SplitNode, place
from myco.layers import layer_shares
from myco.protocol import Device, ModelShape, RpcVersion

GiB, MiB = 1024**3, 1024**2
V7: RpcVersion = (7, 0, 0)

# Gemma 3 270M Q4_K_M at n_ctx 512, as llama.cpp's load log reports it: a 170 MiB token
# embedding on the CPU, a copy of it as the (tied) output head, 512 MiB of logits beside it,
# layers of 3.6 MiB on average (4.2 with the CPU's repacked copy), compute buffers under 20 MiB.
# tests/nodeagent/test_rpc.py loads the two-worker plan below and checks it holds.
GEMMA = ModelShape(n_layers=18, layer_bytes=int(4.2 * MiB), kv_bytes_per_layer=MiB // 2,
                   input_bytes=170 * MiB, output_bytes=170 * MiB, logits_bytes=513 * MiB)
GEMMA_COMPUTE = 20 * MiB
LLAMA_70B = ModelShape.estimate(40 * GiB, 80, 16 * MiB)  # Q4, 4096 tokens of 8x128 KV heads
LLAMA_7B = ModelShape.estimate(int(4.1 * GiB), 32, 16 * MiB)


def make_node(name: str, *, gpu_gb: float = 0, ram_gb: float = 0, has_model: bool = False,
              rpc: RpcVersion | None = V7, ram_mb: float = 0) -> SplitNode:
    devices = [Device("cpu", "CPU", int(ram_gb * GiB + ram_mb * MiB))]
    if gpu_gb:
        devices.append(Device("gpu", "CUDA0", int(gpu_gb * GiB)))
    return SplitNode(name, has_model, rpc, tuple(devices))


def layout(plan: Plan | Refusal) -> list[tuple[str, str, int]]:
    """(node, device, units) in llama.cpp's order; asserts what every plan must satisfy."""
    assert isinstance(plan, Plan), plan
    units = [d.count for d in plan.devices]
    assert [d.first for d in plan.devices] == [sum(units[:i]) for i in range(len(units))]
    shape_layers = sum(units) - 1
    assert layer_shares(shape_layers, plan.n_gpu_layers, plan.tensor_split,
                        len(plan.devices) - 1) == tuple(units)
    holders = [d for d in plan.devices if d.holds_output]
    assert len(holders) == 1 and holders[0] is [d for d in plan.devices if d.count][-1]
    assert all(d.need_bytes <= d.free_bytes for d in plan.devices)
    assert plan.devices[0].role == "head" and plan.devices[0].kind == "cpu"
    return [(d.node, d.device, d.count) for d in plan.devices]


def test_one_node_that_fits_runs_it_alone() -> None:
    nodes = [make_node("rig", gpu_gb=24, ram_gb=32, has_model=True), make_node("spare", ram_gb=64)]
    plan = place(LLAMA_7B, nodes)
    assert layout(plan) == [("rig", "CPU", 0), ("rig", "CUDA0", 33)]
    assert isinstance(plan, Plan)
    assert plan.workers == () and plan.reason.startswith("no split")
    assert (plan.n_gpu_layers, plan.tensor_split) == (33, (33.0,))


def test_a_node_too_small_for_its_gpu_offloads_the_rest_to_its_own_cpu() -> None:
    plan = place(LLAMA_7B, [make_node("laptop", gpu_gb=2, ram_gb=8, has_model=True)])
    (_, _, cpu), (_, _, gpu) = layout(plan)
    assert isinstance(plan, Plan) and plan.workers == ()
    assert cpu + gpu == 33 and 0 < gpu < 33


def test_nothing_fits_refuses_with_every_nodes_reason() -> None:
    nodes = [make_node("laptop", ram_gb=8, has_model=True), make_node("pi", ram_gb=2, rpc=None),
             make_node("old", ram_gb=64, rpc=(6, 0, 0)), make_node("nuc", ram_gb=4)]
    refusal = place(LLAMA_70B, nodes)
    assert isinstance(refusal, Refusal)
    reasons = {r.node: r.reason for r in refusal.reasons}
    assert reasons == {
        "laptop": "as head: does not fit alone (8.0 GiB lent) nor with workers nuc "
                  "(12.0 GiB in all)",
        "nuc": "does not hold the model file, so cannot be the head; "
               "as worker: its 4.0 GiB are not enough with the others",
        "old": "does not hold the model file, so cannot be the head; "
               "speaks RPC 6.0.0, head laptop speaks 7.0.0",
        "pi": "does not hold the model file, so cannot be the head; speaks no RPC",
    }
    assert refusal.message.startswith("no placement for the model (about 41.")
    assert "laptop: as head" in refusal.message and "pi: " in refusal.message


def test_no_head_refuses() -> None:
    refusal = place(LLAMA_7B, [make_node("big", gpu_gb=80)])
    assert isinstance(refusal, Refusal)
    assert refusal.reasons[0].reason == "does not hold the model file, so cannot be the head"


def test_3090_rig_and_mini_pc_holding_a_70b_model() -> None:
    nodes = [make_node("minipc", ram_gb=32, has_model=True),
             make_node("rig3090", gpu_gb=24, ram_gb=16)]
    plan = place(LLAMA_70B, nodes)
    assert layout(plan) == [("minipc", "CPU", 34), ("rig3090", "CUDA0", 47)]
    assert isinstance(plan, Plan)
    assert plan.workers == ("rig3090",) and plan.devices[-1].holds_output
    assert (plan.n_gpu_layers, plan.tensor_split) == (47, (47.0,))


def test_a_worker_lends_its_cpu_too_when_the_head_is_short() -> None:
    nodes = [make_node("minipc", ram_gb=16, has_model=True),
             make_node("rig3090", gpu_gb=24, ram_gb=16)]
    # Registration order: the slower device first, so the GPU holds the output layer.
    assert layout(place(LLAMA_70B, nodes)) == [
        ("minipc", "CPU", 30), ("rig3090", "CPU", 4), ("rig3090", "CUDA0", 47)]


def test_only_workers_of_the_heads_rpc_version_take_part() -> None:
    head = make_node("head", ram_gb=8, has_model=True)
    old, new = make_node("aa-old", ram_gb=64, rpc=(6, 0, 0)), make_node("zz-new", ram_gb=64)
    plan = place(LLAMA_70B, [head, old, new])
    assert isinstance(plan, Plan) and plan.workers == ("zz-new",)
    refusal = place(LLAMA_70B, [head, old])
    assert isinstance(refusal, Refusal)
    assert "speaks RPC 6.0.0, head head speaks 7.0.0" in refusal.message


def test_a_head_without_rpc_runs_only_what_fits_it() -> None:
    head = make_node("head", ram_gb=8, has_model=True, rpc=None)
    refusal = place(LLAMA_70B, [head, make_node("big", ram_gb=64)])
    assert isinstance(refusal, Refusal)
    assert "head head speaks no RPC" in refusal.message


@pytest.mark.parametrize(("nodes", "head", "workers"), [
    # identical candidates: by name
    ([make_node("h", ram_gb=8, has_model=True), make_node("w2", ram_gb=64),
      make_node("w1", ram_gb=64)], "h", ("w1",)),
    ([make_node("h2", ram_gb=64, has_model=True), make_node("h1", ram_gb=64, has_model=True)],
     "h1", ()),
    # a GPU worker before a bigger CPU one
    ([make_node("h", ram_gb=8, has_model=True), make_node("cpu-box", ram_gb=128),
      make_node("gpu-box", gpu_gb=48)], "h", ("gpu-box",)),
    # fewer hops before faster devices: one CPU worker rather than two GPU ones
    ([make_node("h", ram_gb=8, has_model=True), make_node("g1", gpu_gb=20),
      make_node("g2", gpu_gb=20), make_node("cpu-box", ram_gb=64)], "h", ("cpu-box",)),
    # no split at all before any split, even onto a GPU
    ([make_node("h", ram_gb=64, has_model=True), make_node("gpu-box", gpu_gb=80)], "h", ()),
    # of two heads that fit alone, the one with the GPU
    ([make_node("a", ram_gb=64, has_model=True),
      make_node("b", gpu_gb=48, ram_gb=8, has_model=True)], "b", ()),
])
def test_preferences(nodes: list[SplitNode], head: str, workers: tuple[str, ...]) -> None:
    plan = place(LLAMA_70B, nodes)
    layout(plan)
    assert isinstance(plan, Plan) and (plan.head, plan.workers) == (head, workers)


def test_gemma_with_tiny_memory_over_one_worker() -> None:
    nodes = [make_node("head", ram_mb=250, has_model=True), make_node("w", ram_mb=800)]
    plan = place(GEMMA, nodes, compute_bytes=GEMMA_COMPUTE)
    # the head's CPU keeps the embedding and what else fits; the worker the rest and the output
    assert layout(plan) == [("head", "CPU", 12), ("w", "CPU", 7)]
    assert isinstance(plan, Plan) and (plan.n_gpu_layers, plan.tensor_split) == (7, (7.0,))


def test_gemma_with_tiny_memory_over_two_workers() -> None:
    nodes = [make_node("head", ram_mb=200, has_model=True), make_node("a", ram_mb=750),
             make_node("b", ram_mb=100)]
    plan = place(GEMMA, nodes, compute_bytes=GEMMA_COMPUTE)
    # b cannot hold the output head and its logits, so it comes first (RPC0), a last (RPC1)
    assert layout(plan) == [("head", "CPU", 2), ("b", "CPU", 6), ("a", "CPU", 11)]
    assert isinstance(plan, Plan) and plan.workers == ("b", "a")
    assert (plan.n_gpu_layers, plan.tensor_split) == (17, (6.0, 11.0))
    alone = place(GEMMA, nodes[:2], compute_bytes=GEMMA_COMPUTE)
    assert isinstance(alone, Refusal)  # 8 MiB short: b's 100 MiB made the difference
    assert alone.message == "no placement for the model (about 958 MiB in all): " \
        "a: does not hold the model file, so cannot be the head; as worker: its 750 MiB are " \
        "not enough with the others; head: as head: does not fit alone (200 MiB lent) nor " \
        "with workers a (950 MiB in all)"


def test_estimate_spreads_the_file_over_input_layers_and_output() -> None:
    shape = ModelShape.estimate(2000, 18, 7)
    assert (shape.layer_bytes, shape.input_bytes, shape.output_bytes) == (100, 100, 100)

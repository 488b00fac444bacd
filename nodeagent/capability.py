"""Capability: what this node can run, a pure function of hardware and model metadata.

For each model: does it fit in GPU memory, in RAM, or not at all (weights + KV cache for the
configured context + a compute buffer).  For the node: a coarse role, from an ordered table of
rules where the first that holds wins.  For a split across nodes: each model's `ModelShape`,
what the gateway's planner (gateway/placement.py) needs to know of it.

How to add a role: add it to `myco.protocol.Role`, put a `_RoleRule(role, holds)` in
`ROLE_RULES` above the first rule it should win over (order is priority; `holds` gets the usable
GPU and RAM bytes), and add a hardware profile for it to tests/nodeagent/test_capability.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from myco.protocol import COMPUTE_BYTES, Capabilities, Fit, ModelFit, ModelShape, Role
from nodeagent.hardware import Hardware
from nodeagent.store import ModelMeta

GiB = 1024**3
RAM_RESERVE = 1 * GiB  # left for the OS and the node agent itself
APPLE_GPU_SHARE = 0.75  # Metal's recommended working set is about 3/4 of unified memory
N_UBATCH = 512  # llama.cpp's default micro-batch: the logits buffer holds this many tokens


class _RoleRule(msgspec.Struct, frozen=True):
    role: Role
    holds: Callable[[int, int], bool]  # (usable GPU bytes, usable RAM bytes)


# Thresholds, in what one model may use: 16 GiB of GPU holds a 13-24B Q4 model with its cache;
# 4 GiB of GPU or 8 GiB of RAM a 3-8B Q4 one; 2 GiB of RAM an embedding or sub-1B model.
ROLE_RULES: tuple[_RoleRule, ...] = (
    _RoleRule("large-chat", lambda gpu, ram: gpu >= 16 * GiB),
    _RoleRule("small-chat", lambda gpu, ram: gpu >= 4 * GiB or ram >= 8 * GiB),
    _RoleRule("embeddings", lambda gpu, ram: ram >= 2 * GiB),
    _RoleRule("coordinator", lambda gpu, ram: True),
)


def kv_cache_bytes_per_layer(meta: ModelMeta, n_ctx: int) -> int:
    """f16 K and V for one layer at the context the node will use."""
    ctx = min(n_ctx, meta.context_length) if meta.context_length else n_ctx
    return ctx * meta.n_head_kv * (meta.key_length + meta.value_length) * 2


def kv_cache_bytes(meta: ModelMeta, n_ctx: int) -> int:
    return meta.n_layers * kv_cache_bytes_per_layer(meta, n_ctx)


def shape(meta: ModelMeta, n_ctx: int) -> ModelShape:
    """From the tensor sizes in the file; without them, the file spread evenly over the layers,
    the input and the output (as ModelShape.estimate does)."""
    n = max(meta.n_layers, 1)
    layer = inputs = output = -(-meta.file_size // (n + 2))
    if meta.input_bytes and meta.layers_bytes:
        layer, inputs = -(-meta.layers_bytes // n), meta.input_bytes
        output = meta.output_bytes or meta.input_bytes
    return ModelShape(meta.n_layers, layer, kv_cache_bytes_per_layer(meta, n_ctx), inputs, output,
                 meta.n_vocab * N_UBATCH * 4)


def usable_gpu(hw: Hardware) -> tuple[int, str]:
    """Bytes one model may use on a GPU, and a label for it (0, "" without a GPU)."""
    if hw.unified_memory:
        return int(hw.ram_total * APPLE_GPU_SHARE), f"{hw.cpu_model} (unified memory)"
    # No multi-GPU split yet: a model goes on one GPU, so the one with the most free memory.
    best = max((g for g in hw.gpus if g.vendor == "nvidia"), key=lambda g: g.memory_free,
               default=None)
    return (best.memory_free, best.name) if best is not None else (0, "")


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def fit_model(meta: ModelMeta, n_ctx: int, gpu: int, gpu_name: str, ram: int, *,
              compute_buffer: int = COMPUTE_BYTES) -> ModelFit:
    """Where one model fits, given the usable GPU and RAM bytes; GPU first."""
    kv = kv_cache_bytes(meta, n_ctx)
    need = meta.file_size + kv + compute_buffer
    fit: Fit
    if gpu and need <= gpu:
        fit, reason = "gpu", f"needs {_gib(need)}, {_gib(gpu)} free on {gpu_name}"
    elif need <= ram:
        fit, reason = "ram", f"needs {_gib(need)}, {_gib(ram)} of RAM free"
    else:
        on_gpu = f"{_gib(gpu)} free on {gpu_name} and " if gpu else ""
        fit, reason = "none", f"needs {_gib(need)}, only {on_gpu}{_gib(ram)} of RAM free"
    return ModelFit(meta.id, fit, need, meta.file_size, kv, reason)


def classify(hw: Hardware, models: Sequence[ModelMeta], n_ctx: int, *,
             compute_buffer: int = COMPUTE_BYTES, ram_reserve: int = RAM_RESERVE,
             memory_limit: int | None = None) -> Capabilities:
    """The node's role and each model's fit, at a context of `n_ctx` tokens.  Usable RAM is what
    is available minus `ram_reserve` (never negative); every model also needs `compute_buffer`
    bytes besides its weights and KV cache.  `memory_limit` (bytes) caps usable RAM and GPU."""
    gpu, gpu_name = usable_gpu(hw)
    # Unified memory is one pool: a model on the "GPU" is in RAM too.
    ram = max(0, hw.ram_available - ram_reserve)
    if memory_limit is not None:
        gpu, ram = min(gpu, memory_limit), min(ram, memory_limit)
    role = next(rule.role for rule in ROLE_RULES if rule.holds(gpu, ram))
    return Capabilities(role, gpu, ram, tuple(
        fit_model(m, n_ctx, gpu, gpu_name, ram, compute_buffer=compute_buffer) for m in models))

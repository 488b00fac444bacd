"""Capability: what this node can run, a pure function of hardware and model metadata.

For each model: does it fit in GPU memory, in RAM, or not at all (weights + KV cache for the
configured context + a compute buffer).  For the node: a coarse role, from an ordered table of
rules where the first that holds wins.  To add a role, add a `_RoleRule` at the right place in
`ROLE_RULES` (order is priority) and a case to the table test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

from nodeagent.hardware import Hardware
from nodeagent.store import ModelMeta

Fit = Literal["gpu", "ram", "none"]
Role = Literal["coordinator", "embeddings", "small-chat", "large-chat"]

GiB = 1024**3
COMPUTE_BUFFER = 256 * 1024**2  # llama.cpp's scratch buffers, roughly, for small batches
RAM_RESERVE = 1 * GiB  # left for the OS and the node agent itself
APPLE_GPU_SHARE = 0.75  # Metal's recommended working set is about 3/4 of unified memory


class ModelFit(msgspec.Struct, frozen=True):
    model: str
    fit: Fit
    need_bytes: int
    weights_bytes: int
    kv_cache_bytes: int
    reason: str


class Capabilities(msgspec.Struct, frozen=True):
    role: Role
    gpu_memory: int  # usable for one model
    ram_memory: int
    models: tuple[ModelFit, ...]


class _RoleRule(msgspec.Struct, frozen=True):
    role: Role
    holds: Callable[[int, int], bool]  # (usable GPU bytes, usable RAM bytes)


ROLE_RULES: tuple[_RoleRule, ...] = (
    _RoleRule("large-chat", lambda gpu, ram: gpu >= 16 * GiB),
    _RoleRule("small-chat", lambda gpu, ram: gpu >= 4 * GiB or ram >= 8 * GiB),
    _RoleRule("embeddings", lambda gpu, ram: ram >= 2 * GiB),
    _RoleRule("coordinator", lambda gpu, ram: True),
)


def kv_cache_bytes(meta: ModelMeta, n_ctx: int) -> int:
    """f16 K and V for every layer at the context the node will use."""
    ctx = min(n_ctx, meta.context_length) if meta.context_length else n_ctx
    return meta.n_layers * ctx * meta.n_head_kv * (meta.key_length + meta.value_length) * 2


def usable_gpu(hw: Hardware) -> tuple[int, str]:
    """Memory one model may use on a GPU, and which.  No multi-GPU split yet: the largest."""
    if hw.unified_memory:
        return int(hw.ram_total * APPLE_GPU_SHARE), "unified memory"
    if not hw.gpus:
        return 0, ""
    best = max(hw.gpus, key=lambda g: g.memory_free)
    return best.memory_free, best.name


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def fit_model(meta: ModelMeta, n_ctx: int, gpu: int, gpu_name: str, ram: int, *,
              compute_buffer: int = COMPUTE_BUFFER) -> ModelFit:
    kv = kv_cache_bytes(meta, n_ctx)
    need = meta.file_size + kv + compute_buffer
    if gpu and need <= gpu:
        fit: Fit = "gpu"
        reason = f"needs {_gib(need)}, {_gib(gpu)} free on {gpu_name}"
    elif need <= ram:
        fit, reason = "ram", f"needs {_gib(need)}, {_gib(ram)} of RAM free"
    else:
        fit = "none"
        reason = f"needs {_gib(need)}, only {_gib(max(gpu, ram))} free"
    return ModelFit(meta.id, fit, need, meta.file_size, kv, reason)


def classify(hw: Hardware, models: Sequence[ModelMeta], n_ctx: int, *,
             compute_buffer: int = COMPUTE_BUFFER, ram_reserve: int = RAM_RESERVE) -> Capabilities:
    gpu, gpu_name = usable_gpu(hw)
    # Unified memory is one pool: a model on the "GPU" is in RAM too.
    ram = max(0, hw.ram_available - ram_reserve)
    role = next(rule.role for rule in ROLE_RULES if rule.holds(gpu, ram))
    fits = tuple(fit_model(m, n_ctx, gpu, gpu_name, ram, compute_buffer=compute_buffer)
                 for m in models)
    return Capabilities(role, gpu, ram, fits)

"""The gateway-node contract: every message that crosses between them, written once.

    node -> LAN        mDNS `SERVICE`, TXT {id, role, models}
    gateway -> node    GET  /node/info                    -> NodeInfo
    gateway -> node    POST /node/rpc/lease  LeaseRequest -> Lease
    gateway -> head    POST /v1/...  with header `SPLIT_HEADER`: Split (JSON)
    gateway -> node    POST /v1/chat/tokens  a chat request  -> TokenCount

Both sides encode and decode these structs (frozen, msgspec); neither builds the dicts by hand.
A field added here is seen by both at once; a node older than its gateway simply lacks it
(every field the gateway reads has a default).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NewType

import msgspec

NodeId = NewType("NodeId", str)  # a node's identity: the id of its TLS certificate
GatewayId = NewType("GatewayId", str)
RpcVersion = tuple[int, int, int]  # ggml RPC protocol: major, minor, patch
DeviceKind = Literal["gpu", "cpu"]
Fit = Literal["gpu", "ram", "none"]
Role = Literal["coordinator", "embeddings", "small-chat", "large-chat", ""]

SERVICE = "_myco._tcp.local."
SPLIT_HEADER = "x-myco-split"
TOKENS_PATH = "/chat/tokens"  # under the node's /v1, as /chat/completions
MiB = 1024**2
COMPUTE_BYTES = 256 * MiB  # llama.cpp's scratch buffers per device, roughly, for small batches


class TokenCount(msgspec.Struct, frozen=True):
    """A chat request's prompt, rendered with the model's chat template, in tokens."""

    input_tokens: int


class Device(msgspec.Struct, frozen=True):
    """A device a node lends for split inference."""

    kind: DeviceKind
    name: str  # "CPU", "CUDA0": what the node's rpc worker serves with --device
    free_bytes: int  # what the node lends for this model


class ModelShape(msgspec.Struct, frozen=True):
    """What placing a model's layers needs, at the context the head will use."""

    n_layers: int  # repeating layers ({arch}.block_count)
    layer_bytes: int  # weights of one repeating layer
    kv_bytes_per_layer: int
    input_bytes: int = 0  # token embedding: always on the head's CPU
    output_bytes: int = 0  # output head, on the last device (a copy when tied to the input)
    logits_bytes: int = 0  # n_vocab x n_ubatch x 4: compute buffer beside the output head

    @classmethod
    def estimate(cls, file_size: int, n_layers: int, kv_bytes_per_layer: int) -> ModelShape:
        """From the file size alone: input, each layer and the output weigh the same."""
        piece = -(-file_size // (n_layers + 2))
        return cls(n_layers, piece, kv_bytes_per_layer, piece, piece)


class ModelFit(msgspec.Struct, frozen=True):
    model: str
    fit: Fit
    need_bytes: int = 0
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    reason: str = ""


class Capabilities(msgspec.Struct, frozen=True):
    role: Role = ""
    gpu_memory: int = 0  # usable for one model
    ram_memory: int = 0
    models: tuple[ModelFit, ...] = ()


class RpcInfo(msgspec.Struct, frozen=True):
    protocol: RpcVersion | None = None  # None: llama.cpp built without RPC
    tunnel_port: int | None = None
    devices: tuple[Device, ...] = ()


class SplitWorker(msgspec.Struct, frozen=True):
    node: str
    id: NodeId  # the worker node's id: its tunnel exit must present this certificate
    host: str
    tunnel_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]


class Split(msgspec.Struct, frozen=True):
    """The `x-myco-split` header: the gateway's plan for a model on this (head) node."""

    n_gpu_layers: int
    tensor_split: tuple[Annotated[float, msgspec.Meta(ge=0)], ...]
    workers: tuple[SplitWorker, ...]  # in RPC registration order: RPC0, RPC1, ...


class LeaseRequest(msgspec.Struct, frozen=True):
    """POST /node/rpc/lease: lend `device` to the head node with this id and certificate."""

    model: str
    head_id: NodeId
    head_certificate: str  # PEM
    device: str = "CPU"


class Lease(msgspec.Struct, frozen=True):
    tunnel_port: int
    protocol: RpcVersion
    device: str
    worker_port: int


class Lent(msgspec.Struct, frozen=True):
    """One device this node lends now."""

    head: NodeId
    model: str
    device: str
    worker_port: int
    pid: int
    connections: int


class RunnerState(msgspec.Struct, frozen=True):
    model: str
    pid: int | None
    pending: int  # requests generating or waiting for a slot
    slots: int = 1
    busy: int | None = None  # slots generating now (None: the runner did not say)


class SplitState(Split, frozen=True):
    """A split runner on its head: its plan and load record (nodeagent/runner/loadrecord.py)."""

    record: dict[str, Any] | None = None


class NodeInfo(msgspec.Struct, frozen=True):
    """GET /node/info: who the node is, what it holds and serves, and its load."""

    name: str = ""
    id: NodeId = NodeId("")
    version: str = ""
    certificate: str = ""  # PEM: what a worker pins for split inference with this head
    uptime_s: float = 0.0
    hardware: dict[str, Any] = {}  # nodeagent.hardware.Hardware, shown as it is
    capabilities: Capabilities = Capabilities()
    models: tuple[dict[str, Any], ...] = ()  # nodeagent.store.ModelMeta of each stored model
    loaded: tuple[str, ...] = ()
    queue: dict[str, int] = {}
    runners: tuple[RunnerState, ...] = ()
    n_ctx: int = 0  # per slot
    slots: int = 0  # per loaded model; 0: not reported (an older or a fake node)
    threads: int = 0
    rpc: RpcInfo = RpcInfo()
    shapes: dict[str, ModelShape] = {}
    splits: dict[str, SplitState] = {}
    lent: tuple[Lent, ...] = ()

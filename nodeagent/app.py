"""The node agent's composition root: `build(settings, identity)` serves this machine's models.

    request -> check the body -> find the model in the store -> take a place in its queue ->
    runner (started on first use) -> relay the runner's answer, bytes as they come

A request with an `x-myco-split` header (`protocol.Split`, planned by the gateway) is served by a
runner loaded with that split, on this node as the head; `POST /node/rpc/lease` lends this
node's devices to other heads (nodeagent/lending/).  The model directory is listed off the event
loop, on every request, so a model copied into it is served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import httpx
import msgspec
from litestar import Litestar, Request, get, post

from myco import protocol
from myco.errors import BadRequest, ModelNotFound, TargetFailed, Unavailable
from myco.guard import request_guard
from myco.handlers import exception_handlers
from myco.identity import Identity, parse_id
from myco.protocol import Capabilities
from myco.proxy import relay, unless_gone
from myco.serve import bind
from myco.tls import server_context
from nodeagent import capability, hardware, pairing
from nodeagent.announce import Announcer
from nodeagent.lending.lender import Lender
from nodeagent.runner import wire
from nodeagent.runner_pool import RunnerPool
from nodeagent.settings import NodeSettings
from nodeagent.store import ModelMeta, ModelStore

log = logging.getLogger("myco.node")
VERSION = "0.1.0"
_BODIES: dict[str, type[wire.ChatRequest | wire.CompletionRequest | wire.EmbeddingRequest]] = {
    "/v1/chat/completions": wire.ChatRequest, "/v1/completions": wire.CompletionRequest,
    "/v1/embeddings": wire.EmbeddingRequest, "/v1" + protocol.TOKENS_PATH: wire.ChatRequest}


def split_header(text: str | None) -> protocol.Split | None:
    """The decoded x-myco-split header (None when absent); BadRequest naming it if invalid."""
    if text is None:
        return None
    try:
        split = msgspec.json.decode(text, type=protocol.Split)
        for worker in split.workers:
            parse_id(worker.id)
        if len(split.tensor_split) < len(split.workers):
            raise ValueError("tensor_split needs a share for every worker")
    except ValueError as exc:  # msgspec's errors are ValueErrors too
        raise BadRequest(f"invalid x-myco-split header: {exc}", param="x-myco-split") from None
    return split


class NodeAgent:
    """The state behind the handlers: store, hardware snapshot, runner pool, lender."""

    def __init__(self, settings: NodeSettings, hw: hardware.Hardware, identity: Identity, *,
                 port: int, tls: ssl.SSLContext, paired: Iterable[str] = ()) -> None:
        self.settings, self.identity, self.port = settings, identity, port
        self.tls = tls  # what the node serves with (myco.tls.server_context)
        self.paired = set(paired)  # ids of the gateways it trusts
        self.store = ModelStore(Path(settings.models_dir))
        self.hardware = hw  # snapshot at start: what capability is judged against
        self.threads = settings.threads or hardware.default_threads()
        self.slots = settings.parallel or hardware.default_slots(hw)
        self.kv_tokens = settings.n_ctx * self.slots  # the KV cache holds every slot's context
        self.pool = RunnerPool(n_ctx=settings.n_ctx, slots=self.slots, threads=self.threads,
                               queue_size=settings.queue_size, load_timeout=settings.load_timeout,
                               retry_after=settings.retry_after, identity=identity)
        self.lender = Lender(identity, host=settings.host, threads=self.threads,
                             cache_dir=Path(settings.state_dir) / "rpc-cache",
                             idle=settings.lend_idle, memory_limit=settings.memory_limit,
                             cache_limit=settings.rpc_cache_limit)
        self.started = time.time()

    def capabilities(self, models: list[ModelMeta] | None = None) -> Capabilities:
        return capability.classify(self.hardware, self.store.list() if models is None else models,
                                   self.kv_tokens, memory_limit=self.settings.memory_limit)

    async def infer(self, request: Request[Any, Any, Any]) -> Any:
        raw = await request.body()
        body = wire.decode(raw, _BODIES[request.url.path], n_ctx=self.settings.n_ctx)
        split = split_header(request.headers.get("x-myco-split"))
        meta = await asyncio.to_thread(self.store.get, body.model)
        if meta is None:
            raise ModelNotFound(f"model {body.model!r} is not in this node's store "
                                f"({self.settings.models_dir})", param="model")
        # Judge only this model: get() just listed the store, once is enough.
        # A split was planned by the gateway for a model that may not fit here alone.
        fit = self.capabilities([meta]).models[0]
        if fit.fit == "none" and split is None:
            raise Unavailable(f"model {meta.id} does not fit on this node: {fit.reason}")
        runner = await self.pool.get(meta, split)
        with contextlib.ExitStack() as place:
            place.enter_context(runner.admit())
            try:
                response = await unless_gone(runner.client.send(runner.client.build_request(
                    "POST", request.url.path, content=raw,
                    headers={"content-type": "application/json"}), stream=True),
                    request.receive)
            except httpx.HTTPError as exc:
                raise TargetFailed(f"runner for {meta.id} failed: {type(exc).__name__}") from None
            # The place is held until the response is relayed to its end (a stream: later).
            return await relay(response, {"x-myco-node": self.settings.name},
                               place.pop_all().close, receive=request.receive)

    async def info(self) -> protocol.NodeInfo:
        now = await asyncio.to_thread(hardware.detect)
        models = await asyncio.to_thread(self.store.list)
        runners = sorted(self.pool.runners.items())
        busy = await asyncio.gather(*(r.busy() for _, r in runners))
        return protocol.NodeInfo(
            name=self.settings.name, id=protocol.NodeId(self.identity.id), version=VERSION,
            certificate=self.identity.pem(), uptime_s=round(time.time() - self.started, 1),
            hardware=msgspec.to_builtins(now), capabilities=self.capabilities(models),
            models=tuple(msgspec.to_builtins(m) for m in models),
            loaded=tuple(k for k, _ in runners), queue=self.pool.queue_depths(),
            runners=tuple(protocol.RunnerState(k, r.process.pid, r.pending, self.slots, b)
                          for (k, r), b in zip(runners, busy, strict=True)),
            n_ctx=self.settings.n_ctx, slots=self.slots, threads=self.threads,
            rpc=self.lender.info(now),
            shapes={m.id: capability.shape(m, self.kv_tokens) for m in models},
            splits={k: protocol.SplitState(**msgspec.structs.asdict(r.split),
                                           record=msgspec.to_builtins(r.record))
                    for k, r in runners if r.split is not None},
            lent=self.lender.lent())

    async def model_list(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m.id, "object": "model", "created": 0, "owned_by": self.settings.name}
            for m in await asyncio.to_thread(self.store.list)]}


def build(settings: NodeSettings,
          identity: Identity) -> tuple[Litestar, socket.socket, ssl.SSLContext]:
    """The node agent for `settings`, bound to its port, and the TLS context to serve with.
    ConfigError for a bad gateways.toml or models.toml; OSError when the port cannot be bound."""
    paired = pairing.load(Path(settings.state_dir))
    sock = bind(settings.host, settings.port)
    tls = server_context(identity, paired.values())
    agent = NodeAgent(settings, hardware.detect(), identity, port=sock.getsockname()[1],
                      tls=tls, paired=paired)
    models = agent.store.list()
    log.info("node %s (id %s): %d model(s) in %s: %s", settings.name, identity.id, len(models),
             settings.models_dir, ", ".join(m.id for m in models) or "none")
    if paired:
        log.info("serving %d paired gateway(s): %s", len(paired), ", ".join(paired))
    else:
        log.warning("no gateway is paired with this node: it refuses every connection until "
                    "`myco node allow GATEWAY_ID` (the gateway logs its id at start)")
    return create_app(agent), sock, tls


def create_app(agent: NodeAgent) -> Litestar:
    announcer = None
    if agent.settings.announce_on is not None:
        caps = agent.capabilities()
        announcer = Announcer(agent.settings.announce_on, agent.settings.name, agent.port, {
            "id": agent.identity.id, "role": caps.role, "models": str(len(caps.models))})

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        if announcer is not None:
            await announcer.start()
        following = asyncio.create_task(pairing.follow(Path(agent.settings.state_dir),
                                                       agent.tls, agent.paired))
        await agent.lender.start()
        unloading = asyncio.create_task(agent.pool.unload_idle(agent.settings.unload_after))
        try:
            yield
        finally:
            unloading.cancel()
            following.cancel()
            if announcer is not None:
                await announcer.stop()
            await agent.pool.close()
            await agent.lender.stop()

    @post(list(_BODIES))
    async def infer(request: Request[Any, Any, Any]) -> Any:
        return await agent.infer(request)

    @post("/node/rpc/lease", status_code=200)
    async def lease(request: Request[Any, Any, Any]) -> protocol.Lease:
        return await agent.lender.lease(wire.decode(await request.body(), protocol.LeaseRequest))

    @get("/v1/models")
    async def models() -> dict[str, Any]:
        return await agent.model_list()

    @get("/node/info")
    async def info() -> protocol.NodeInfo:
        return await agent.info()

    @get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "name": agent.settings.name}

    return Litestar(route_handlers=[infer, lease, models, info, health], lifespan=[lifespan],
                    exception_handlers=exception_handlers({"x-myco-node": agent.settings.name}),
                    middleware=[request_guard(None)],  # JSON only; mutual TLS: any Host
                    openapi_config=None, logging_config=None, debug=False)

"""The gateway's composition root: `create_app(settings, policy)` wires the data path.

    request -> decode routing fields -> resolve(request, policy, swarm) -> forward the
    original bytes to the chosen target (next one on a connection failure) -> relay

The dry-run endpoint calls the same `resolve` and sends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import msgspec
from litestar import Litestar, Request, Response, get, post

from gateway.audit import AuditEntry, AuditLog
from gateway.discovery import Discovered, Discovery, judge
from gateway.egress import Egress, EgressDenied, EgressGuard
from gateway.policy import ENDPOINT_KINDS, EndpointKind, Policy, PolicyError
from gateway.resolve import Decision, RoutingRequest, resolve
from gateway.settings import GatewaySettings, default_audit_path
from gateway.swarm import SwarmWatcher
from gateway.upstream import Endpoint, UpstreamPool
from gateway.wire import DryRunFields, RoutingFields, decode
from myco.errors import Denied, ModelNotFound, MycoError, TargetFailed, Unauthorized, Unavailable
from myco.handlers import exception_handlers
from myco.proxy import relay

_REFUSALS: dict[int, type[MycoError]] = {403: Denied, 404: ModelNotFound, 503: Unavailable}
_PATHS: dict[EndpointKind, str] = {"chat": "/chat/completions", "completions": "/completions",
                                   "embeddings": "/embeddings"}


def client_keys(policy: Policy, environ: Mapping[str, str]) -> dict[str, str]:
    """API key value -> client name, read from the variables the policy names."""
    keys: dict[str, str] = {}
    for client in policy.clients.values():
        value = environ.get(client.key_env)
        if not value:
            raise PolicyError(policy.source, None, f"clients.{client.name}.key_env: environment "
                              f"variable {client.key_env} is not set")
        keys[value] = client.name
    return keys


class Gateway:
    """The state behind the handlers: policy, swarm view, forwarding client, audit log."""

    def __init__(self, settings: GatewaySettings, policy: Policy,
                 environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.policy = policy
        self.keys = client_keys(policy, environ)
        self.upstream_keys = {u.name: environ.get(u.api_key_env, "")
                              for u in policy.upstreams.values() if u.api_key_env}
        egress = Egress(policy.endpoints())
        self.pool = UpstreamPool(egress, connect_timeout=settings.connect_timeout,
                                 read_timeout=settings.read_timeout)
        self.endpoints = {name: Endpoint.from_url(self.base_url(name))
                          for name in [*policy.nodes, *policy.upstreams]}
        # Health checks: httpx, behind the same egress check; no proxies from the environment
        # (a proxy would be a destination the policy did not list), no redirects.
        self.client = httpx.AsyncClient(
            transport=EgressGuard(httpx.AsyncHTTPTransport(), egress), trust_env=False,
            follow_redirects=False, timeout=settings.health_timeout)
        self.watcher = SwarmWatcher(policy.nodes, self.client, interval=settings.health_interval,
                                    timeout=settings.health_timeout)
        self.audit = AuditLog(settings.audit_path or policy.audit.path or default_audit_path())
        self.discovery = Discovery(settings.discover, on_found=self._found) \
            if settings.discover else None
        self._checks: set[asyncio.Task[None]] = set()
        self._recorded: set[tuple[str, str]] = set()

    def strangers(self) -> list[tuple[str, str]]:
        """Discovered nodes the policy does not list (or whose identity does not match)."""
        if self.discovery is None:
            return []
        return [(f"{found.name} ({found.id})", why) for found in self.discovery.nodes.values()
                for listed, why in [judge(found, self.policy)] if listed is None]

    def _found(self, found: Discovered) -> None:
        """A listed node announced itself: check it now rather than at the next poll.  One the
        policy does not list is recorded in the audit log, once, and never routed to."""
        listed, why = judge(found, self.policy)
        if listed is None and (found.name, found.id) not in self._recorded:
            self._recorded.add((found.name, found.id))
            self.audit.record(AuditEntry(
                time=time.time(), request_id="", endpoint="discovery", model=None, client=None,
                rule="none", target=f"{found.name} ({found.id})", status=403, latency_ms=0.0,
                reason=f"discovered at {', '.join(found.addresses)}:{found.port}: {why}"))
        if listed is not None:
            task = asyncio.ensure_future(self.watcher.check_some([listed]))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    def authenticate(self, request: Request[Any, Any, Any]) -> str | None:
        if not self.keys:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        name = self.keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if name is None:
            raise Unauthorized("missing or unknown API key for this gateway")
        return name

    def base_url(self, target: str) -> str:
        node = self.policy.nodes.get(target)
        return node.base_url if node else self.policy.upstreams[target].base_url

    def headers_for(self, target: str, request: Request[Any, Any, Any]) -> dict[str, str]:
        headers = {"content-type": request.headers.get("content-type", "application/json"),
                   "accept": request.headers.get("accept", "*/*")}
        key = self.upstream_keys.get(target)
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    async def forward(self, request: Request[Any, Any, Any], endpoint: EndpointKind) -> Any:
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        raw = await request.body()
        fields: RoutingFields | None = None
        client: str | None = None
        decision: Decision | None = None
        target: str | None = None
        try:
            client = self.authenticate(request)
            fields = decode(raw, RoutingFields)
            decision = resolve(RoutingRequest(endpoint, fields.model, client, fields.has_tools),
                               self.policy, self.watcher.views, self.strangers())
            if not decision.allowed:
                raise _REFUSALS[decision.status](decision.message)
            failures: list[str] = []
            for target in decision.eligible:
                try:
                    upstream = await self.pool.send(self.endpoints[target], _PATHS[endpoint],
                                                    self.headers_for(target, request), raw)
                except EgressDenied as exc:
                    raise TargetFailed(str(exc)) from None
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    failures.append(f"{target}: cannot connect ({exc})")
                    if target in self.policy.nodes:
                        self.watcher.mark_failed(target, f"connection failed: {exc}")
                    continue
                except httpx.HTTPError as exc:
                    raise TargetFailed(f"{target} failed: {type(exc).__name__}: {exc}") from None
                if upstream.is_redirect:  # never followed: it would leave the listed endpoints
                    await upstream.aclose()
                    raise TargetFailed(f"{target} answered with a redirect "
                                       f"({upstream.status_code}); redirects are not followed")
                self._record(started, request_id, endpoint, fields, client, decision, target,
                             upstream.status_code, None, raw)
                return await relay(upstream, {"x-myco-node": target,
                                              "x-myco-rule": decision.rule_name,
                                              "x-request-id": request_id})
            target = None
            raise TargetFailed("every target failed: " + "; ".join(failures))
        except MycoError as exc:
            exc.extra_headers.update({
                "x-myco-node": target or "-",
                "x-myco-rule": decision.rule_name if decision else "none",
                "x-request-id": request_id})
            self._record(started, request_id, endpoint, fields, client, decision, target,
                         exc.status, exc.message, raw)
            raise

    def _record(self, started: float, request_id: str, endpoint: str,
                fields: RoutingFields | None, client: str | None, decision: Decision | None,
                target: str | None, status: int, reason: str | None, raw: bytes) -> None:
        self.audit.record(AuditEntry(
            time=time.time(), request_id=request_id, endpoint=endpoint,
            model=fields.model if fields else None, client=client,
            rule=decision.rule_name if decision else "none", target=target, status=status,
            latency_ms=round((time.perf_counter() - started) * 1000, 3), reason=reason,
            body=raw.decode("utf-8", "replace") if self.policy.audit.prompts else None))

    def dry_run(self, request: Request[Any, Any, Any], raw: bytes) -> dict[str, Any]:
        client = self.authenticate(request)
        fields = decode(raw, DryRunFields)
        routing = RoutingRequest(fields.endpoint, fields.model, client, fields.has_tools)
        decision = resolve(routing, self.policy, self.watcher.views, self.strangers())
        return {"request": msgspec.to_builtins(routing), "rule_name": decision.rule_name,
                **msgspec.to_builtins(decision)}

    def models(self, client: str | None) -> list[dict[str, Any]]:
        """Models the policy makes reachable for `client`, with the targets that serve each."""
        served: dict[str, list[str]] = {}
        offers = [(name, view.models or frozenset()) for name, view in self.watcher.views.items()]
        offers += [(u.name, frozenset(u.models or ())) for u in self.policy.upstreams.values()]
        for target, models in offers:
            for model in sorted(models):
                decisions = [resolve(RoutingRequest(kind, model, client), self.policy,
                                     self.watcher.views) for kind in ENDPOINT_KINDS]
                if any(c.target == target for d in decisions for c in d.candidates):
                    served.setdefault(model, []).append(target)
        return [{"id": model, "object": "model", "created": 0, "owned_by": targets[0],
                 "targets": targets} for model, targets in sorted(served.items())]

    def swarm(self) -> list[dict[str, Any]]:
        out = []
        for name, node in self.policy.nodes.items():
            view = self.watcher.views[name]
            info = self.watcher.infos.get(name)
            out.append({"name": name, "address": node.address, "healthy": view.healthy,
                        "reason": view.reason, "models": sorted(view.models or ()),
                        "loaded": info.loaded if info else [], "queue": info.queue if info else {},
                        "role": info.capabilities.role if info else None})
        return out


def create_app(settings: GatewaySettings, policy: Policy, *,
               environ: Mapping[str, str] = os.environ) -> Litestar:
    gateway = Gateway(settings, policy, environ)

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await gateway.watcher.start()
        if gateway.discovery is not None:
            await gateway.discovery.start()
        try:
            yield
        finally:
            if gateway.discovery is not None:
                await gateway.discovery.stop()
            await gateway.watcher.stop()
            await gateway.pool.aclose()
            await gateway.client.aclose()
            gateway.audit.close()

    @post("/v1/chat/completions")
    async def chat(request: Request[Any, Any, Any]) -> Any:
        return await gateway.forward(request, "chat")

    @post("/v1/completions")
    async def completions(request: Request[Any, Any, Any]) -> Any:
        return await gateway.forward(request, "completions")

    @post("/v1/embeddings")
    async def embeddings(request: Request[Any, Any, Any]) -> Any:
        return await gateway.forward(request, "embeddings")

    @get("/v1/models")
    async def models(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return {"object": "list", "data": gateway.models(gateway.authenticate(request))}

    @post("/v1/policy/dry-run", status_code=200)
    async def dry_run(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return gateway.dry_run(request, await request.body())

    @get("/v1/policy")
    async def show_policy(request: Request[Any, Any, Any]) -> Response[bytes]:
        gateway.authenticate(request)
        body = msgspec.json.encode(policy)
        return Response(body, media_type="application/json")

    @get("/v1/swarm")
    async def swarm(request: Request[Any, Any, Any]) -> dict[str, Any]:
        gateway.authenticate(request)
        discovered = gateway.discovery.snapshot(policy) if gateway.discovery else []
        return {"nodes": gateway.swarm(), "discovered": discovered}

    @get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "policy": policy.source,
                "nodes": {n: v.healthy for n, v in gateway.watcher.views.items()}}

    return Litestar(
        route_handlers=[chat, completions, embeddings, models, dry_run, show_policy, swarm,
                        health],
        lifespan=[lifespan],
        exception_handlers=exception_handlers({"x-myco-node": "-", "x-myco-rule": "none"}),
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        logging_config=None,  # keep the CLI's log format
        debug=False,
    )


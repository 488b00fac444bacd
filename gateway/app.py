"""The gateway's composition root: `create_app(settings, policy)` wires the data path.

    request -> decode routing fields -> resolve(request, policy, swarm, loads) -> forward the
    body re-encoded from what was parsed (gateway/wire.py) to the chosen target (the next
    one while no byte has reached the client, also when a target answers 429 or 503 and
    another is left) -> relay (myco/proxy.py)

The dry-run endpoint calls the same `resolve` and sends nothing.  The Responses and Messages
APIs take the same path, translated to a chat request and back (gateway/translation.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import msgspec
from litestar import Litestar, Request, Response, get, post, route

from gateway.audit import Attempt, AuditEntry, AuditLog, bounded
from gateway.egress import Egress, EgressDenied
from gateway.inflight import InFlight
from gateway.lease import lease
from gateway.membership import Membership
from gateway.messages import Messages, anthropic_errors
from gateway.policy import ENDPOINT_KINDS, EndpointKind, Policy, PolicyError
from gateway.pool import ConnectionPool, Peer
from gateway.resolve import Decision, RoutingRequest, resolve
from gateway.responses import Responses, ResponseStore
from gateway.settings import GatewaySettings, default_audit_path
from gateway.translation import Answer, Dialect
from gateway.wire import DryRunFields, RoutingFields, forwarded
from myco import protocol
from myco.errors import Denied, ModelNotFound, MycoError, TargetFailed, Unauthorized, Unavailable
from myco.guard import allowed_names, cors, request_guard
from myco.handlers import exception_handlers
from myco.identity import Identity
from myco.proxy import TargetLost, relay, unless_gone
from myco.tls import client_context

_REFUSALS: dict[int, type[MycoError]] = {403: Denied, 404: ModelNotFound, 503: Unavailable}
_BUSY = (429, 503)  # answers after which the next target is tried, if one is left
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
    """The state behind the handlers: policy, swarm view, forwarding pool, audit log."""

    def __init__(self, settings: GatewaySettings, policy: Policy, identity: Identity,
                 environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.policy = policy
        self.keys = client_keys(policy, environ)
        self.upstream_keys = {u.name: environ.get(u.api_key_env, "")
                              for u in policy.upstreams.values() if u.api_key_env}
        self.egress = Egress(policy.addresses())
        self.pool = ConnectionPool(self.egress, connect_timeout=settings.connect_timeout,
                                 read_timeout=settings.read_timeout,
                                 node_tls=client_context(identity), node_id=identity.id)
        self.upstreams = {u.name: Peer.from_url(u.base_url)
                          for u in policy.upstreams.values()}
        self.audit = AuditLog(settings.audit_path or policy.audit.path or default_audit_path())
        self.members = Membership(settings, policy, self.pool, self.egress, self.audit)
        self.inflight = InFlight()
        self.store = ResponseStore(Path(settings.state_dir) / "responses.sqlite3",
                                   settings.responses_max_age, settings.responses_max_bytes)

    def peer(self, target: str) -> Peer | None:
        """Where to send to `target` now (None: a node whose address is not known yet)."""
        return self.upstreams[target] if target in self.upstreams else self.members.peer(target)

    def authenticate(self, request: Request[Any, Any, Any]) -> str | None:
        if not self.keys:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":  # Anthropic's clients send x-api-key
            key = request.headers.get("x-api-key", "")
        name = self.keys.get(key.strip())
        if name is None:
            raise Unauthorized("missing or unknown API key for this gateway")
        return name

    def headers_for(self, target: str, request: Request[Any, Any, Any]) -> dict[str, str]:
        headers = {"content-type": request.headers.get("content-type", "application/json"),
                   "accept": request.headers.get("accept", "*/*")}
        key = self.upstream_keys.get(target)
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    async def forward(self, request: Request[Any, Any, Any], endpoint: EndpointKind,
                      dialect: Dialect | None = None) -> Any:
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        raw = await request.body()
        fields: RoutingFields | None = None
        client: str | None = None
        decision: Decision | None = None
        target: str | None = None
        attempts: list[Attempt] = []
        try:
            client = self.authenticate(request)
            raw, fields = forwarded(dialect.chat_body(raw, client) if dialect else raw,
                                    RoutingFields)
            decision = resolve(RoutingRequest(endpoint, fields.model, client, fields.has_tools),
                               self.policy, self.members.views, self.members.strangers(),
                               self.inflight.loads(fields.model, self.members.views))
            if not decision.allowed:
                raise _REFUSALS[decision.status](decision.message)
            split = {}
            if decision.plan is not None:
                plan = await lease(decision.plan, fields.model, self.members, self.pool,
                                   self.settings.lease_timeout)
                if plan is not None:
                    split = {protocol.SPLIT_HEADER: msgspec.json.encode(plan).decode()}
            # Until an answer is returned no byte has reached the client: any target that
            # fails before then is followed by the next one.  A client that leaves meanwhile
            # closes the attempt in progress.
            path = dialect.path if dialect else _PATHS[endpoint]
            target, answer = await unless_gone(self._attempt(
                request, path, raw, split, decision, request_id, attempts, fields.model),
                request.receive)
            if answer is None:
                raise TargetFailed("every target failed: " + "; ".join(
                    f"{a.target}: {a.outcome}" for a in attempts))
            answer = dialect.answer(answer) if dialect else answer
            self._record(started, request_id, endpoint, fields, client, decision, target,
                         answer.status_code or 200, None, raw, attempts)
            return answer
        except MycoError as exc:
            exc.extra_headers.update({
                "x-myco-node": target or "-",
                "x-myco-rule": decision.rule_name if decision else "none",
                "x-request-id": request_id})
            self._record(started, request_id, endpoint, fields, client, decision, target,
                         exc.status, exc.message, raw, attempts)
            raise

    async def _attempt(self, request: Request[Any, Any, Any], path: str, body: bytes,
                       split: dict[str, str], decision: Decision, request_id: str,
                       attempts: list[Attempt], model: str) -> tuple[str | None, Answer | None]:
        """Send to the eligible targets in order: the first answer, with who gave it (None:
        every target failed; `attempts` says how).  Each attempt counts as in flight to its
        target until it fails, or until its answer has been relayed (`relay` calls `done`)."""
        for n, target in enumerate(decision.eligible, 1):
            done = self.inflight.begin(target, model)
            try:
                answer = await self._try(target, request, path, body, split, decision,
                                         request_id, done, n == len(decision.eligible))
            except BaseException as exc:
                done()
                if isinstance(exc, asyncio.CancelledError):  # the client left, or we stop
                    attempts.append(Attempt(target, "abandoned"))
                raise
            if isinstance(answer, str):
                done()
                attempts.append(Attempt(target, answer))
                continue
            attempts.append(Attempt(target, f"answered {answer.status_code or 200}"))
            return target, answer
        return None, None

    async def _try(self, target: str, request: Request[Any, Any, Any], path: str, body: bytes,
                   split: dict[str, str], decision: Decision, request_id: str,
                   done: Callable[[], None], last: bool) -> Answer | str:
        """`target`'s answer, or why it gave none (the next target may be tried then).  A
        429 or 503 is passed on only from the `last` target."""
        where = self.peer(target)
        if where is None:
            return "no address known"
        if path == protocol.TOKENS_PATH and target in self.upstreams:
            return "an upstream cannot count tokens"
        headers = {**self.headers_for(target, request), **split}
        try:
            upstream = await self.pool.send(where, path, headers, body)
        except EgressDenied as exc:
            raise TargetFailed(str(exc)) from None
        except httpx.HTTPError as exc:
            connect = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            if connect and target in self.policy.nodes:
                self.members.mark_failed(target, f"connection failed: {exc}")
            outcome = "cannot connect" if connect else "failed before answering"
            return f"{outcome}: {type(exc).__name__}: {exc}"
        status = upstream.status_code
        if upstream.is_redirect or (status in _BUSY and not last):
            await upstream.aclose()
            if upstream.is_redirect:  # never followed: it would leave the listed addresses
                return f"answered with a redirect ({status}); redirects are not followed"
            wait = upstream.headers.get("retry-after", "")
            self.inflight.back_off(target, float(wait) if wait.isdigit() else 1.0)
            return f"busy: answered {status}" + (f", retry after {wait} s" if wait else "")
        try:
            return await relay(upstream, {"x-myco-node": target, "x-myco-rule": decision.rule_name,
                                          "x-request-id": request_id}, done,
                               max_body=self.settings.max_response_bytes)
        except TargetLost as exc:
            return exc.message

    def _record(self, started: float, request_id: str, endpoint: str,
                fields: RoutingFields | None, client: str | None, decision: Decision | None,
                target: str | None, status: int, reason: str | None, raw: bytes,
                attempts: list[Attempt]) -> None:
        self.audit.record(AuditEntry(
            time=time.time(), request_id=request_id, endpoint=endpoint,
            model=bounded(fields.model) if fields else None, client=client,
            rule=decision.rule_name if decision else "none", target=target, status=status,
            latency_ms=round((time.perf_counter() - started) * 1000, 3), reason=reason,
            attempts=tuple(attempts),
            body=raw.decode("utf-8", "replace") if self.policy.audit.prompts else None))

    def dry_run(self, request: Request[Any, Any, Any], raw: bytes) -> dict[str, Any]:
        client = self.authenticate(request)
        _, fields = forwarded(raw, DryRunFields)
        routing = RoutingRequest(fields.endpoint, fields.model, client, fields.has_tools)
        decision = resolve(routing, self.policy, self.members.views, self.members.strangers(),
                           self.inflight.loads(fields.model, self.members.views))
        return {"request": msgspec.to_builtins(routing), "rule_name": decision.rule_name,
                **msgspec.to_builtins(decision)}

    def models(self, client: str | None) -> list[dict[str, Any]]:
        """Models the policy makes reachable for `client`, with the targets that serve each."""
        served: dict[str, list[str]] = {}
        offers = [(name, view.models or frozenset()) for name, view in self.members.views.items()]
        offers += [(u.name, frozenset(u.models or ())) for u in self.policy.upstreams.values()]
        for target, models in offers:
            for model in sorted(models):
                decisions = [resolve(RoutingRequest(kind, model, client), self.policy,
                                     self.members.views) for kind in ENDPOINT_KINDS]
                if any(c.target == target for d in decisions for c in d.candidates):
                    served.setdefault(model, []).append(target)
        return [{"id": model, "object": "model", "created": 0, "owned_by": targets[0],
                 "targets": targets} for model, targets in sorted(served.items())]


def create_app(settings: GatewaySettings, policy: Policy, identity: Identity, *,
               environ: Mapping[str, str] = os.environ) -> Litestar:
    gateway = Gateway(settings, policy, identity, environ)
    handlers = exception_handlers({"x-myco-node": "-", "x-myco-rule": "none"})

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await gateway.members.start()
        try:
            yield
        finally:
            await gateway.members.stop()
            await gateway.pool.aclose()
            gateway.audit.close()
            gateway.store.close()

    @post("/v1/chat/completions")
    async def chat(request: Request[Any, Any, Any]) -> Any:
        return await gateway.forward(request, "chat")

    @post("/v1/completions")
    async def completions(request: Request[Any, Any, Any]) -> Any:
        return await gateway.forward(request, "completions")

    @post("/v1/embeddings")
    async def embeddings(request: Request[Any, Any, Any]) -> Any:
        return await gateway.forward(request, "embeddings")

    @post("/v1/responses")
    async def responses(request: Request[Any, Any, Any]) -> Any:
        return await gateway.forward(request, "responses", Responses(gateway.store))

    @route("/v1/responses/{response_id:str}", http_method=["GET", "DELETE"], status_code=200)
    async def stored(request: Request[Any, Any, Any], response_id: str) -> Any:
        found = gateway.store.get(response_id, gateway.authenticate(request),
                                  delete=request.method == "DELETE")
        return found["response"] if request.method == "GET" else \
            {"id": response_id, "object": "response", "deleted": True}

    anthropic = anthropic_errors(handlers)

    @post("/v1/messages", exception_handlers=anthropic)
    async def messages(request: Request[Any, Any, Any]) -> Any:
        return await gateway.forward(request, "messages", Messages())

    @post("/v1/messages/count_tokens", exception_handlers=anthropic)
    async def count_tokens(request: Request[Any, Any, Any]) -> Any:
        return await gateway.forward(request, "messages", Messages(count=True))

    @get("/v1/models")
    async def models(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return {"object": "list", "data": gateway.models(gateway.authenticate(request))}

    @post("/v1/policy/dry-run", status_code=200)
    async def dry_run(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return gateway.dry_run(request, await request.body())

    @get("/v1/policy")
    async def show_policy(request: Request[Any, Any, Any]) -> Response[bytes]:
        gateway.authenticate(request)
        return Response(msgspec.json.encode(policy), media_type="application/json")

    @get("/v1/swarm")
    async def swarm(request: Request[Any, Any, Any]) -> dict[str, Any]:
        gateway.authenticate(request)
        return gateway.members.swarm()

    @get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "policy": policy.source, "id": identity.id,
                "nodes": {n: v.healthy for n, v in gateway.members.views.items()}}

    @get("/v1/identity")
    async def show_identity() -> dict[str, Any]:
        """Public: what a node needs to pair with this gateway (`myco node allow`)."""
        return {"id": identity.id, "certificate": identity.pem()}

    return Litestar(
        route_handlers=[chat, completions, embeddings, responses, stored, messages,
                        count_tokens, models, dry_run, show_policy, swarm, health, show_identity],
        lifespan=[lifespan], exception_handlers=handlers,
        middleware=[request_guard(allowed_names(settings.host, settings.allowed_hosts))],
        cors_config=cors(policy.cors_origins), request_max_body_size=settings.max_body_bytes,
        openapi_config=None, logging_config=None, debug=False)  # logging: the CLI's log format


"""The policy: which nodes, upstreams and clients exist, and the ordered routes between them.

A policy is a TOML file the user wrote.  Only what it lists is reachable; routes are tried in
order and the first whose `match` fits the request decides (forward to targets in order of
preference, or deny; `split` names the nodes that may together run a model none of the
targets can hold alone).  Anything malformed stops start-up with a `PolicyError` naming the file,
the line and the reason.  Model names are compared as `model_key` gives them (NFKC, case
folded, invisible characters dropped), on both sides (route globs, upstream `models` lists, what
nodes serve), so `deny` for `secret-*` also catches `SECRET-PLANS`, ` Secret-plans` and
`secret-plans` typed in fullwidth letters.  Example:

    [nodes.local]
    address = "127.0.0.1:8788"

    [[routes]]
    match = { model = "*" }
    forward = ["local"]
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import tomllib
import unicodedata
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

import msgspec

from gateway import toml_lines
from myco.errors import ConfigError
from myco.identity import parse_id

_T = TypeVar("_T")
EndpointKind = Literal["chat", "completions", "embeddings", "responses", "messages"]
ENDPOINT_KINDS: tuple[EndpointKind, ...] = ("chat", "completions", "embeddings", "responses",
                                            "messages")


class PolicyError(ConfigError):
    def __init__(self, file: str, line: int | None, reason: str) -> None:
        super().__init__(f"{file}:{line}" if line else file, reason)
        self.file, self.line = file, line


# --- the file as written (strict: unknown keys are errors) -------------------------------
class _Node(msgspec.Struct, forbid_unknown_fields=True):
    address: str | None = None  # host:port; None: wherever discovery finds the id
    id: str | None = None  # the node's identity (`myco node id`): its TLS certificate


class _Upstream(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    cloud: bool
    api_key_env: str | None = None
    models: list[str] | None = None


class _Client(msgspec.Struct, forbid_unknown_fields=True):
    key_env: str


class _Match(msgspec.Struct, forbid_unknown_fields=True):
    model: str = "*"
    endpoint: EndpointKind | list[EndpointKind] | None = None
    client: str | list[str] | None = None
    tools: bool | None = None


class _Route(msgspec.Struct, forbid_unknown_fields=True):
    match: _Match = msgspec.field(default_factory=_Match)
    forward: list[str] | None = None
    deny: str | None = None
    split: list[str] | None = None  # nodes that may hold layers of a model none fits alone
    balance: Literal["first", "least-busy"] = "first"  # first: spill over when slots are full


class _Audit(msgspec.Struct, forbid_unknown_fields=True):
    path: str | None = None
    prompts: bool = False


class _Cors(msgspec.Struct, forbid_unknown_fields=True):
    origins: list[str] = []  # pages (scheme://host[:port]) that may call the API; none: no CORS


class _File(msgspec.Struct, forbid_unknown_fields=True):
    # Tables of named entries are converted one entry at a time (`_entries`), because msgspec's
    # error path does not say which key of a dict was wrong.
    nodes: dict[str, dict[str, Any]] = {}
    upstreams: dict[str, dict[str, Any]] = {}
    clients: dict[str, dict[str, Any]] = {}
    routes: list[_Route] = []
    audit: _Audit = msgspec.field(default_factory=_Audit)
    cors: _Cors = msgspec.field(default_factory=_Cors)


# --- the validated policy -----------------------------------------------------------------
class Node(msgspec.Struct, frozen=True):
    """A node the gateway may use.  Traffic to it is mutual TLS; the certificate it presents
    must have `id` (only a loopback node may leave it out: it is then not pinned)."""

    name: str
    address: str | None  # host:port; None: learnt from discovery (mDNS) by id
    id: str | None = None


class Upstream(msgspec.Struct, frozen=True):
    name: str
    url: str  # base URL including /v1, as an OpenAI client's base_url
    cloud: bool
    api_key_env: str | None
    models: tuple[str, ...] | None  # None: whatever a route sends it

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")


class Client(msgspec.Struct, frozen=True):
    name: str
    key_env: str


class Match(msgspec.Struct, frozen=True):
    model: str
    endpoints: tuple[EndpointKind, ...] | None
    clients: tuple[str, ...] | None
    tools: bool | None


class Route(msgspec.Struct, frozen=True):
    index: int
    line: int | None
    match: Match
    forward: tuple[str, ...]
    deny: str | None
    split: tuple[str, ...] = ()
    balance: str = "first"

    @property
    def name(self) -> str:
        return f"routes[{self.index}]"

    @property
    def text(self) -> str:
        m = self.match
        parts = [f"model={m.model}", *(f"{k}={'|'.join(v)}" for k, v in (
            ("endpoint", m.endpoints), ("client", m.clients)) if v is not None)]
        if m.tools is not None:
            parts.append(f"tools={str(m.tools).lower()}")
        action = f"deny: {self.deny}" if self.deny is not None else \
            "forward " + ", ".join(self.forward)
        if self.split:
            action += "; split over " + ", ".join(self.split)
        if self.balance != "first":
            action += f"; balance {self.balance}"
        return " ".join(parts) + " -> " + action


class Audit(msgspec.Struct, frozen=True):
    path: str | None
    prompts: bool


class Policy(msgspec.Struct, frozen=True):
    source: str
    nodes: dict[str, Node]
    upstreams: dict[str, Upstream]
    clients: dict[str, Client]
    routes: tuple[Route, ...]
    audit: Audit
    cors_origins: tuple[str, ...] = ()  # myco/guard.py: no CORS header unless listed here

    def addresses(self) -> list[tuple[str, int]]:
        """Every host:port the policy names, that the gateway may open a connection to.
        (Discovered addresses of nodes listed by id are added as discovery finds them.)"""
        pairs = [split_host_port(n.address) for n in self.nodes.values() if n.address]
        urls = [urlsplit(upstream.url) for upstream in self.upstreams.values()]
        return pairs + [(u.hostname or "", u.port or (443 if u.scheme == "https" else 80))
                        for u in urls]


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} must be host:port")
    host = host.strip("[]")
    if ":" in host:
        ipaddress.IPv6Address(host)  # a bare IPv6 host must be bracketed and valid
    return host, int(port)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_key(name: str) -> str:
    """The form in which model names are compared: NFKC, case folded, without format or
    control characters, stripped.  A spelling that a target might read as the same name must
    not slip past a rule written for it."""
    if name.isascii() and name.isprintable():
        return name.lower().strip()  # the common case; NFKC and casefold are identities here
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return "".join(c for c in folded if unicodedata.category(c)[0] != "C").strip()


def matches(match: Match, endpoint: EndpointKind, model: str, client: str | None,
            has_tools: bool) -> bool:
    """Whether a route's `match` fits a request.  Model names match as shell globs, both
    sides compared as `model_key` gives them (`model` is expected in that form already)."""
    return (fnmatch.fnmatchcase(model, model_key(match.model))
            and (match.endpoints is None or endpoint in match.endpoints)
            and (match.clients is None or (client is not None and client in match.clients))
            and (match.tools is None or match.tools == has_tools))


def load(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file; raise `PolicyError` with file, line and reason."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc.reason})"
        raise PolicyError(name, None, f"cannot read policy: {why}") from None
    return parse(text, name)


def parse(text: str, source: str = "<policy>") -> Policy:
    lines = toml_lines.index_lines(text)

    def fail(path: toml_lines.Path, reason: str) -> PolicyError:
        return PolicyError(source, toml_lines.line_of(lines, path), reason)

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        raise PolicyError(source, int(found.group(1)) if found else None,
                          f"not valid TOML: {str(exc).split(' (at line')[0]}") from None

    def convert(value: Any, kind: type[_T], prefix: toml_lines.Path) -> _T:
        try:
            return msgspec.convert(value, kind)
        except msgspec.ValidationError as exc:
            where = (*prefix, *toml_lines.parse_msgspec_path(str(exc)))
            reason = str(exc).split(" - at `")[0]
            if unknown := re.match(r"Object contains unknown field `(.+)`", reason):
                reason = f"unknown key `{unknown.group(1)}`"
                where = (*where, unknown.group(1))  # points at the offending line
            reason = reason.replace("Object missing required field", "missing required key")
            dotted = _dotted(where[:-1] if unknown else where)
            raise fail(where, f"{dotted}: {reason}" if dotted else reason) from None

    doc = convert(raw, _File, ())
    nodes: dict[str, Node] = {}
    for name, node in _entries(doc.nodes, _Node, "nodes", convert):
        try:
            host = None if node.address is None else split_host_port(node.address)[0]
        except ValueError as exc:
            raise fail(("nodes", name, "address"), f"nodes.{name}.address: {exc}") from None
        try:
            node_id = None if node.id is None else parse_id(node.id)
        except ValueError as exc:
            raise fail(("nodes", name, "id"), f"nodes.{name}.id: {exc}") from None
        if node_id is None and host is None:
            raise fail(("nodes", name), f"nodes.{name}: give `id` (what `myco node id` prints "
                       "on that machine), `address`, or both")
        if node_id is None and host is not None and not is_loopback(host):
            raise fail(("nodes", name, "address"), f"nodes.{name}: `id` is required for a node "
                       "off this machine (run `myco node id` there); only a loopback node may "
                       "go unpinned")
        nodes[name] = Node(name, node.address, node_id)

    upstreams: dict[str, Upstream] = {}
    for name, up in _entries(doc.upstreams, _Upstream, "upstreams", convert):
        parts = urlsplit(up.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise fail(("upstreams", name, "url"),
                       f"upstreams.{name}.url: {up.url!r} must be an http(s) URL")
        if name in nodes:
            raise fail(("upstreams", name), f"{name!r} is both a node and an upstream")
        upstreams[name] = Upstream(name, up.url, up.cloud, up.api_key_env, _as_tuple(up.models))

    clients = {name: Client(name, c.key_env)
               for name, c in _entries(doc.clients, _Client, "clients", convert)}

    routes: list[Route] = []
    for i, r in enumerate(doc.routes):
        where: toml_lines.Path = ("routes", i)
        if (r.forward is None) == (r.deny is None):
            raise fail(where, f"routes[{i}]: give exactly one of `forward` or `deny`")
        for target in r.forward or ():
            if target not in nodes and target not in upstreams:
                raise fail((*where, "forward"),
                           f"routes[{i}].forward: {target!r} is not a listed node or upstream")
        if r.forward is not None and not r.forward:
            raise fail((*where, "forward"), f"routes[{i}].forward: lists no target")
        for name in r.split or ():
            if name not in nodes:
                raise fail((*where, "split"), f"routes[{i}].split: {name!r} is not a listed node")
        if r.split is not None and r.deny is not None:
            raise fail((*where, "split"), f"routes[{i}]: a `deny` route splits nothing")
        m = r.match
        wanted = _as_tuple(m.client)
        for client in wanted or ():
            if client not in clients:
                raise fail((*where, "match"),
                           f"routes[{i}].match.client: {client!r} is not a listed client")
        endpoints = cast(tuple[EndpointKind, ...] | None, _as_tuple(m.endpoint))
        match = Match(m.model, endpoints, wanted, m.tools)
        routes.append(Route(i, toml_lines.line_of(lines, where), match,
                            tuple(r.forward or ()), r.deny, tuple(r.split or ()), r.balance))
    if not routes:
        raise PolicyError(source, None, "no [[routes]]: nothing would be reachable")
    for origin in doc.cors.origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or "*" in origin or \
                origin != f"{parts.scheme}://{parts.netloc}":
            raise fail(("cors", "origins"), f"cors.origins: {origin!r} must be an origin, as "
                       "a browser sends it: scheme://host[:port], no path, no wildcard")
    return Policy(source, nodes, upstreams, clients, tuple(routes),
                  Audit(doc.audit.path, doc.audit.prompts), tuple(doc.cors.origins))


def _entries(table: dict[str, dict[str, Any]], kind: type[_T], section: str,
             convert: Any) -> list[tuple[str, _T]]:
    return [(name, convert(value, kind, (section, name))) for name, value in table.items()]


def _as_tuple(value: str | list[str] | list[EndpointKind] | None) -> tuple[str, ...] | None:
    return None if value is None else (value,) if isinstance(value, str) else tuple(value)


def _dotted(path: toml_lines.Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out

"""The gateway's settings: one frozen object built at start from flags and `MYCO_*` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec
import platformdirs

from myco.guard import ConnectionLimits


class GatewaySettings(ConnectionLimits, frozen=True):  # + the connection limits
    policy_path: str
    host: str = "127.0.0.1"
    port: int = 8787
    max_body_bytes: int = 16 * 1024 * 1024
    audit_path: str | None = None  # None: the policy's [audit] path, else the state dir
    health_interval: float = 1.0  # with the timeout: a dead node is unhealthy within 2 s
    health_timeout: float = 1.0
    connect_timeout: float = 3.0
    lease_timeout: float = 60.0  # a worker node starting its rpc worker for a split
    read_timeout: float = 600.0  # a long generation without streaming
    max_response_bytes: int = 32 * 1024 * 1024  # an answer that is not streamed; beyond: 502
    # The id that pins a node listed on loopback without `id` (`myco up` sets it); None: the
    # id of the node identity in the node's default state dir, if there is one.
    local_node_id: str | None = None
    discover: str | None = None  # interface address to browse mDNS on; None: no discovery
    state_dir: str = ""  # the gateway's identity (key, certificate)
    # Host names served besides loopback and its own addresses (MYCO_GATEWAY_ALLOWED_HOSTS=a,b)
    allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **flags: object) -> GatewaySettings:
        """Flags win over `MYCO_GATEWAY_*` variables, which win over defaults."""
        values: dict[str, object] = {}
        for field in cls.__struct_fields__:
            env = environ.get(f"MYCO_GATEWAY_{field.upper()}")
            if env is not None:
                values[field] = env
        values.update({k: v for k, v in flags.items() if v is not None})
        if isinstance(hosts := values.get("allowed_hosts"), str):
            values["allowed_hosts"] = [h.strip() for h in hosts.split(",") if h.strip()]
        if "policy_path" not in values:
            values["policy_path"] = environ.get("MYCO_POLICY", "policies/default.toml")
        values.setdefault("state_dir", str(default_state_dir()))
        return msgspec.convert(values, cls, strict=False)


def default_state_dir() -> str:
    return str(platformdirs.user_state_path("mycoswarm") / "gateway")


def local_node_certificate() -> Path:
    """Where `myco node` keeps its certificate by default (see nodeagent/settings.py)."""
    return platformdirs.user_state_path("mycoswarm") / "node" / "cert.pem"


def default_audit_path() -> str:
    return str(platformdirs.user_state_path("mycoswarm") / "audit.jsonl")

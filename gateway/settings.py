"""The gateway's settings: one frozen object built at start from flags and `MYCO_*` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import platformdirs

from myco import config
from myco.guard import ConnectionLimits


class GatewaySettings(ConnectionLimits, frozen=True):  # + the connection limits
    policy_path: str
    host: str = "127.0.0.1"
    port: config.Port = 8787
    max_body_bytes: int = 16 * 1024 * 1024
    audit_path: str | None = None  # None: the policy's [audit] path, else the state dir
    health_interval: float = 1.0  # with the timeout: a dead node is unhealthy within 2 s
    health_timeout: float = 1.0
    connect_timeout: float = 3.0
    lease_timeout: float = 60.0  # a worker node starting its rpc worker for a split
    read_timeout: float = 600.0  # a long generation without streaming
    max_response_bytes: int = 32 * 1024 * 1024  # an answer that is not streamed; beyond: 502
    # Pins a loopback node listed without `id` (`myco up` sets it); None: the default node's id
    local_node_id: str | None = None
    discover: str | None = None  # interface address to browse mDNS on; None: no discovery
    state_dir: str = ""  # the gateway's identity (key, certificate), stored Responses
    responses_max_age: float = 30 * 24 * 3600.0  # a stored response is dropped after this,
    responses_max_bytes: int = 256 * 1024 * 1024  # or sooner, oldest first, past this size
    allowed_hosts: tuple[str, ...] = ()  # host names served besides loopback and own addresses

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **flags: object) -> GatewaySettings:
        """Flags win over `MYCO_GATEWAY_*` variables, which win over defaults (the policy:
        `MYCO_POLICY`); ConfigError naming the variable or flag of a value that does not fit."""
        defaults = {"policy_path": environ.get("MYCO_POLICY", "policies/default.toml"),
                    "state_dir": default_state_dir()}
        return config.from_env(cls, "MYCO_GATEWAY_", environ, flags, defaults, {
            "allowed_hosts": lambda hosts: [h.strip() for h in hosts.split(",") if h.strip()]})


def default_state_dir() -> str:
    return str(platformdirs.user_state_path("mycoswarm") / "gateway")


def local_node_certificate() -> Path:
    """Where `myco node` keeps its certificate by default (see nodeagent/settings.py)."""
    return platformdirs.user_state_path("mycoswarm") / "node" / "cert.pem"


def default_audit_path() -> str:
    return str(platformdirs.user_state_path("mycoswarm") / "audit.jsonl")

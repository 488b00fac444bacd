"""The node agent's settings: one frozen object built at start from flags and `MYCO_*` variables."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

import platformdirs

from myco import config
from myco.guard import ConnectionLimits
from nodeagent.store import default_models_dir

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def parse_size(text: str, what: str = "memory limit") -> int:
    """Bytes from "300M", "2G", "1.5GiB" or "123456" (binary: 1M = 2**20); else ValueError."""
    found = _SIZE.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"{what} {text!r}: give bytes, or a number with K, M, G or T (300M)")
    return int(float(found[1]) * 1024 ** "_KMGT".index(found[2].upper() or "_"))


class NodeSettings(ConnectionLimits, frozen=True):  # + the connection limits
    models_dir: str
    name: str
    host: str = "127.0.0.1"
    port: config.Port = 8788
    n_ctx: int = 4096  # context per loaded model; also what capability sizes the KV cache for
    parallel: int | None = None  # slots: requests a model decodes at once; None: by hardware
    queue_size: int = 8  # requests per model waiting for a slot; more get 429
    retry_after: int = 2  # seconds, sent with 429
    load_timeout: float = 300.0
    threads: int | None = None  # llama.cpp threads; None: its default, the physical cores
    state_dir: str = ""  # identity (key, certificate); "" : the user state dir
    announce: str | None = None  # interface address for mDNS; None: --host unless loopback
    memory_limit: int | None = None  # bytes this node uses for models and lends; None: all
    unload_after: float = 900.0  # seconds without a request in flight before a runner stops
    lend_idle: float = 60.0  # seconds a lent rpc worker waits for its head to (re)connect
    rpc_cache_limit: int = 4 * 2**30  # bytes of weights lent devices keep for reloads

    @property
    def announce_on(self) -> str | None:
        if self.announce is not None:
            return self.announce or None
        loopback = self.host.startswith("127.") or self.host in ("::1", "localhost")
        return None if loopback or self.host in ("0.0.0.0", "::") else self.host

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **flags: object) -> NodeSettings:
        """Flags win over `MYCO_NODE_*` variables (and `MYCO_MODELS`), which win over defaults;
        ConfigError naming the variable or flag of a value that does not fit."""
        defaults = {"models_dir": str(default_models_dir()), "name": socket.gethostname(),
                    "state_dir": str(platformdirs.user_state_path("mycoswarm") / "node")}
        return config.from_env(cls, "MYCO_NODE_", environ, flags, defaults, {
            "memory_limit": parse_size,
            "rpc_cache_limit": lambda text: parse_size(text, "rpc cache limit")})

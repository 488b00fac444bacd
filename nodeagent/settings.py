"""The node agent's settings: one frozen object built at start from flags and `MYCO_*` variables."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import msgspec
import platformdirs

from nodeagent.store import default_models_dir


class NodeSettings(msgspec.Struct, frozen=True):
    models_dir: str
    name: str
    host: str = "127.0.0.1"
    port: int = 8788
    n_ctx: int = 4096  # context per loaded model; also what capability sizes the KV cache for
    queue_size: int = 8  # requests per model, running or waiting; more get 429
    retry_after: int = 2  # seconds, sent with 429
    load_timeout: float = 300.0
    threads: int | None = None  # llama.cpp threads; None: its default
    state_dir: str = ""  # identity (key, certificate); "" : the user state dir
    announce: str | None = None  # interface address for mDNS; None: --host unless loopback

    @property
    def announce_on(self) -> str | None:
        if self.announce is not None:
            return self.announce or None
        loopback = self.host.startswith("127.") or self.host in ("::1", "localhost")
        return None if loopback or self.host in ("0.0.0.0", "::") else self.host

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **flags: object) -> NodeSettings:
        """Flags win over `MYCO_NODE_*` variables (and `MYCO_MODELS`), which win over defaults."""
        values: dict[str, object] = {
            "models_dir": str(default_models_dir()), "name": socket.gethostname(),
            "state_dir": str(platformdirs.user_state_path("mycoswarm") / "node")}
        for field in cls.__struct_fields__:
            env = environ.get(f"MYCO_NODE_{field.upper()}")
            if env is not None:
                values[field] = env
        values.update({k: v for k, v in flags.items() if v is not None})
        return msgspec.convert(values, cls, strict=False)

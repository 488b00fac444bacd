"""The node agent's settings: one frozen object built at start from flags and `MYCO_*` variables."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import msgspec

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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **flags: object) -> NodeSettings:
        """Flags win over `MYCO_NODE_*` variables (and `MYCO_MODELS`), which win over defaults."""
        values: dict[str, object] = {"models_dir": str(default_models_dir()),
                                     "name": socket.gethostname()}
        for field in cls.__struct_fields__:
            env = environ.get(f"MYCO_NODE_{field.upper()}")
            if env is not None:
                values[field] = env
        values.update({k: v for k, v in flags.items() if v is not None})
        return msgspec.convert(values, cls, strict=False)

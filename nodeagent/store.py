"""The model store: GGUF files in one directory, each with its metadata read from the header.

The model id is the file stem, unless `models.toml` in the directory gives it an alias:

    [aliases]
    "gemma-3-270m-q4_k_m" = "gemma3"

An invalid `models.toml`, or two files with one id, raises `ConfigError` naming the file (and,
for TOML errors, the line); an unreadable `*.gguf` is skipped with a warning, once per version.
"""

from __future__ import annotations

import logging
import os
import threading
import tomllib
from pathlib import Path

import msgspec
import platformdirs

from myco.errors import ConfigError
from nodeagent.gguf import GGUFError, Header, read_header

log = logging.getLogger("myco.node.store")

_CacheKey = tuple[str, float, int]  # (path, mtime, size)


class ModelMeta(msgspec.Struct, frozen=True):
    id: str  # file stem unless an alias is configured
    path: str
    architecture: str
    file_size: int  # bytes on disk
    n_layers: int  # {arch}.block_count
    context_length: int  # {arch}.context_length: the context the model was trained for
    embedding_length: int
    n_head: int
    n_head_kv: int  # n_head when absent (no grouped-query attention)
    key_length: int  # {arch}.attention.key_length, else embedding_length // n_head
    value_length: int  # likewise
    chat_template: str | None  # tokenizer.chat_template
    name: str | None  # general.name
    n_vocab: int = 0  # {arch}.vocab_size, else the length of tokenizer.ggml.tokens
    input_bytes: int = 0  # token_embd.weight in the file (0: unknown)
    output_bytes: int = 0  # output.weight (0: none, the output is tied to the token embedding)
    layers_bytes: int = 0  # every repeating layer's tensors (blk.N.*) together


def default_models_dir() -> Path:
    """`$MYCO_MODELS`, else the per-user data directory's `models/`."""
    env = os.environ.get("MYCO_MODELS")
    return Path(env) if env else platformdirs.user_data_path("mycoswarm") / "models"


def meta_from_gguf(model_id: str, path: Path, header: Header, size: int) -> ModelMeta:
    """Pure: the fields we use, out of a header (missing numbers default to 0)."""
    kv, tensors = header.metadata, header.tensors
    arch = str(kv.get("general.architecture", "unknown"))

    def num(key: str, default: int) -> int:
        value = kv.get(f"{arch}.{key}", default)
        # bool is an int too, but never a count; per-layer counts are arrays, which we skip
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return int(value) if ok else default

    n_embd, n_head = num("embedding_length", 0), num("attention.head_count", 1) or 1
    template, name = kv.get("tokenizer.chat_template"), kv.get("general.name")
    return ModelMeta(
        id=model_id, path=str(path), architecture=arch, file_size=size,
        n_layers=num("block_count", 0), context_length=num("context_length", 0),
        embedding_length=n_embd, n_head=n_head,
        n_head_kv=num("attention.head_count_kv", n_head),
        key_length=num("attention.key_length", n_embd // n_head),
        value_length=num("attention.value_length", n_embd // n_head),
        chat_template=template if isinstance(template, str) else None,
        name=name if isinstance(name, str) else None,
        n_vocab=num("vocab_size", header.arrays.get("tokenizer.ggml.tokens", 0)),
        input_bytes=tensors.get("token_embd.weight", 0),
        output_bytes=tensors.get("output.weight", 0),
        layers_bytes=sum(n for t, n in tensors.items() if t.startswith("blk.")))


def read_aliases(path: Path) -> dict[str, str]:
    """The `[aliases]` table of a models.toml ({} if the file is absent); ConfigError if invalid."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), str(exc)) from None  # tomllib's has line and column
    aliases = doc.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ConfigError(str(path), "[aliases] must map file stems to model ids (strings)")
    return aliases


class ModelStore:
    """The `*.gguf` files of one directory; headers are parsed once per (path, mtime, size)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[_CacheKey, ModelMeta | None] = {}
        self._lock = threading.Lock()

    def _load(self, path: Path) -> _CacheKey:
        """Parse `path` once per version into the cache; failures are cached (None), logged once."""
        key: _CacheKey = (str(path), -1.0, -1)  # stat failed: a dangling symlink, or gone
        try:
            stat = path.stat()
            key = (str(path), stat.st_mtime, stat.st_size)
            if key not in self._cache:
                self._cache[key] = meta_from_gguf("", path, read_header(path), stat.st_size)
        except (GGUFError, OSError) as exc:
            if key not in self._cache:
                log.warning("skipping %s: %s", path, exc)
                self._cache[key] = None
        return key

    def list(self) -> list[ModelMeta]:
        """Every readable model, sorted by id; [] if the directory does not exist.  It reads the
        disk, so the agent calls it off the event loop; threads may call it at once."""
        if not self.directory.is_dir():
            return []
        aliases = read_aliases(toml := self.directory / "models.toml")
        with self._lock:  # one thread at a time updates the cache
            keys = {path: self._load(path) for path in sorted(self.directory.glob("*.gguf"))}
            self._cache = {key: self._cache[key] for key in keys.values()}  # forget old ones
            metas = {path: m for path, key in keys.items() if (m := self._cache[key]) is not None}
        by_id: dict[str, ModelMeta] = {}
        for path, meta in metas.items():
            model_id = aliases.get(path.stem, path.stem)
            if model_id in by_id:
                raise ConfigError(str(toml), f"model id {model_id!r} names both "
                                  f"{Path(by_id[model_id].path).name} and {path.name}")
            by_id[model_id] = msgspec.structs.replace(meta, id=model_id)
        return sorted(by_id.values(), key=lambda m: m.id)

    def get(self, model_id: str) -> ModelMeta | None:
        return next((m for m in self.list() if m.id == model_id), None)

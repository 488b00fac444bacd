"""Split inference between two real node agents on 127.0.0.1: node B lends its CPU to node A
(the head) through its tunnel; A loads the real model with the layers the x-myco-split header
plans.  The gateway's part (planning, leasing) is played by the test, as the paired gateway.

A's memory limit keeps the model from fitting on A alone; A unloads an idle runner after
4 s, B ends a lease 5 s after its head's last tunnel connection closed."""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from myco.identity import Identity
from myco.layers import layer_split
from myco.tls import certificate_id
from nodeagent import capability
from nodeagent.settings import NodeSettings, parse_size
from nodeagent.store import ModelMeta, ModelStore
from tests.conftest import MODEL_ID, paired_state
from tests.procs import Proc, myco, wait_for

pytestmark = pytest.mark.timeout(60)
MiB = 2**20
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 8, "temperature": 0}
N_GPU_LAYERS, TENSOR_SPLIT = layer_split([2, 17])  # A's CPU: layers 0-1; B: 2-17 + output


def test_memory_limit_parsing() -> None:
    assert [parse_size(t) for t in ("300M", "2G", "1.5GiB", "123456", "64k")] == \
        [300 * MiB, 2 * 1024 * MiB, 1536 * MiB, 123456, 64 * 1024]
    assert NodeSettings.from_env({"MYCO_NODE_MEMORY_LIMIT": "300M"}).memory_limit == 300 * MiB
    assert NodeSettings.from_env({"MYCO_NODE_MEMORY_LIMIT": "1G"},
                                 memory_limit="2G").memory_limit == 2 * 1024 * MiB
    assert NodeSettings.from_env({}).memory_limit is None
    with pytest.raises(ValueError, match="memory limit '3X': give bytes"):
        NodeSettings.from_env({}, memory_limit="3X")


def test_shape_estimate_against_what_llama_cpp_loaded(models_dir: Path) -> None:
    """tests/nodeagent/test_rpc.py's GEMMA, from Gemma's load log at n_ctx 512: layers 4.2 MiB
    (3.6 on average in the file; the head CPU's repacked copy adds the rest), KV 0.5 MiB,
    input = output (tied) 170 MiB, logits 513 MiB."""
    (meta,) = ModelStore(models_dir).list()
    shape = capability.shape(meta, 512)
    assert (shape.n_layers, shape.kv_bytes_per_layer) == (18, MiB // 2)
    assert shape.input_bytes == shape.output_bytes == 170 * MiB
    assert 3.5 * MiB < shape.layer_bytes < 4.2 * MiB
    assert shape.logits_bytes == 512 * MiB
    # Without tensor sizes: the file spread evenly, as gateway.placement.ModelShape.estimate.
    bare = ModelMeta(*(getattr(meta, f) for f in ModelMeta.__struct_fields__[:13]))
    assert capability.shape(bare, 512).input_bytes == -(-meta.file_size // 20)


class Pair:
    """Node A (the head, with the model) and node B (a worker, without it)."""

    def __init__(self, a: Proc, b: Proc, a_state: Path, tls: ssl.SSLContext) -> None:
        self.a, self.b, self.tls = a, b, tls
        self.a_pem = (a_state / "cert.pem").read_text()
        self.a_id = certificate_id(self.a_pem)
        self.b_id = self.info(b)["id"]

    def info(self, node: Proc) -> dict[str, Any]:
        info: dict[str, Any] = httpx.get(node.url + "/node/info", verify=self.tls).json()
        return info

    def lease(self, **body: str) -> httpx.Response:
        body = {"model": MODEL_ID, "head_id": self.a_id, "head_certificate": self.a_pem,
                "device": "CPU", **body}
        return httpx.post(self.b.url + "/node/rpc/lease", json=body, verify=self.tls, timeout=60)

    def header(self, lease: httpx.Response) -> dict[str, str]:
        assert lease.status_code == 200, lease.text
        worker = {"node": "b", "id": self.b_id, "host": "127.0.0.1",
                  "tunnel_port": lease.json()["tunnel_port"]}
        return {"x-myco-split": json.dumps({"n_gpu_layers": N_GPU_LAYERS,
                                            "tensor_split": TENSOR_SPLIT, "workers": [worker]})}

    def chat(self, headers: dict[str, str], **extra: Any) -> httpx.Response:
        return httpx.post(self.a.url + "/v1/chat/completions", json={**CHAT, **extra},
                          headers=headers, verify=self.tls, timeout=60)


@pytest.fixture(scope="module")
def pair(models_dir: Path, tmp_path_factory: pytest.TempPathFactory,
         gateway_identity: Identity, node_tls: ssl.SSLContext) -> Iterator[Pair]:
    a_state = paired_state(tmp_path_factory, gateway_identity)
    common = ["node", "--port", "0", "--n-ctx", "512"]
    env = {"MYCO_NODE_THREADS": "1", "MYCO_NODE_UNLOAD_AFTER": "4", "MYCO_NODE_LEND_IDLE": "5"}
    a = myco(*common, "--name", "a", "--models", str(models_dir), "--memory-limit", "300M",
             "--state-dir", str(a_state), env=env)
    b = myco(*common, "--name", "b", "--models", str(tmp_path_factory.mktemp("none")),
             "--memory-limit", "2G", "--state-dir",
             str(paired_state(tmp_path_factory, gateway_identity)), env=env)
    yield Pair(a, b, a_state, node_tls)
    for proc in (a, b):
        proc.stop()
        print(proc.output)


def test_a_model_too_big_for_the_head_runs_split_over_a_lent_cpu(pair: Pair) -> None:
    alone = pair.chat({})
    assert alone.status_code == 503 and "does not fit on this node" in alone.text
    started = time.monotonic()
    lease = pair.lease()
    leased = time.monotonic() - started
    b = pair.info(pair.b)
    assert lease.json() == {"tunnel_port": b["rpc"]["tunnel_port"], "protocol": [7, 0, 0],
                            "device": "CPU", "worker_port": b["lent"][0]["worker_port"]}
    assert b["rpc"]["devices"] == [{"kind": "cpu", "name": "CPU", "free_bytes": 2048 * MiB}]
    assert pair.lease().json() == lease.json()  # idempotent
    started = time.monotonic()
    answer = pair.chat(pair.header(lease))
    print(f"lease {leased:.2f} s; split load and 8 tokens {time.monotonic() - started:.2f} s")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-myco-node"] == "a"
    assert answer.json()["usage"]["completion_tokens"] == 8
    (choice,) = answer.json()["choices"]
    assert choice["message"]["content"] and choice["finish_reason"] == "length", choice

    a = pair.info(pair.a)
    assert a["capabilities"]["models"][0]["fit"] == "none"  # 300M: not alone
    assert a["certificate"] == pair.a_pem and a["loaded"] == [MODEL_ID]
    assert a["shapes"][MODEL_ID]["input_bytes"] == 170 * MiB
    split = a["splits"][MODEL_ID]
    assert (split["n_gpu_layers"], split["tensor_split"]) == (17, [17.0])
    assert split["workers"] == json.loads(pair.header(lease)["x-myco-split"])["workers"]
    devices = [(d["name"], d["layers"]) for d in split["record"]["devices"]]
    assert devices == [("CPU", [0, 1]), ("RPC0", list(range(2, 19)))]
    (lent,) = pair.info(pair.b)["lent"]
    assert (lent["head"], lent["model"], lent["device"]) == (pair.a_id, MODEL_ID, "CPU")
    assert lent["connections"] >= 1 and psutil.pid_exists(lent["pid"])


def test_a_lent_cpu_serves_one_head_at_a_time(pair: Pair, gateway_identity: Identity) -> None:
    assert pair.chat(pair.header(pair.lease()), max_tokens=1).status_code == 200
    other = pair.lease(head_id=gateway_identity.id, head_certificate=gateway_identity.pem())
    assert other.status_code == 503
    assert f"lent to head {pair.a_id} for {MODEL_ID}, which is using it" in other.text
    for bad in ({"head_certificate": gateway_identity.pem()}, {"device": "CUDA7"},
                {"head_id": "nope"}):
        assert pair.lease(**bad).status_code == 400, bad
    garbled = pair.chat({"x-myco-split": '{"n_gpu_layers": 1}'})
    assert garbled.status_code == 400 and garbled.json()["error"]["param"] == "x-myco-split"


def test_a_worker_killed_mid_stream_ends_the_stream_and_a_new_lease_serves(pair: Pair) -> None:
    header = pair.header(pair.lease())
    (lent,) = pair.info(pair.b)["lent"]
    body = b""
    with httpx.stream("POST", pair.a.url + "/v1/chat/completions", headers=header,
                      json={**CHAT, "max_tokens": 400, "stream": True}, verify=pair.tls,
                      timeout=30) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            body += chunk
            if body.count(b"data: ") == 2:
                os.kill(lent["pid"], signal.SIGKILL)
    assert b"upstream failed mid-stream" in body and b"[DONE]" not in body
    again = pair.lease()
    assert again.json()["worker_port"] != lent["worker_port"]
    answer = pair.chat(pair.header(again))
    assert answer.status_code == 200, answer.text


def test_idle_runners_unload_and_their_lease_ends(pair: Pair) -> None:
    assert pair.chat(pair.header(pair.lease()), max_tokens=1).status_code == 200
    (runner,) = pair.info(pair.a)["runners"]
    (lent,) = pair.info(pair.b)["lent"]
    started = time.monotonic()
    wait_for(lambda: not pair.info(pair.a)["splits"], 10, "the split runner unloaded")
    unloaded = time.monotonic() - started
    wait_for(lambda: not pair.info(pair.b)["lent"], 10, "the lease ended")
    print(f"unloaded after {unloaded:.1f} s, lease ended {time.monotonic() - started:.1f} s")
    assert pair.info(pair.a)["loaded"] == []
    assert not _alive(runner["pid"]) and not _alive(lent["pid"])


def test_children_die_with_a_killed_node_agent(pair: Pair) -> None:
    assert pair.chat(pair.header(pair.lease()), max_tokens=1).status_code == 200
    (runner,) = pair.info(pair.a)["runners"]
    (lent,) = pair.info(pair.b)["lent"]
    for node in (pair.a, pair.b):
        node.popen.kill()  # SIGKILL: no clean-up of its own
    wait_for(lambda: not _alive(runner["pid"]) and not _alive(lent["pid"]), 10,
             "the runner and the lent worker gone")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

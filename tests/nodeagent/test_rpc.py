"""Split inference for real: rpc workers and runners as processes on 127.0.0.1, the real model.

A worker serves one head at a time, so each runner here is stopped before the next one uses
the same worker.  The two-worker split is the planner's (gateway/placement.py) for Gemma on
nodes that lend very little memory: the head's CPU keeps layers 0-1, RPC0 six, RPC1 the rest.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.placement import Plan, SplitNode, place
from myco.protocol import Device, ModelShape
from nodeagent.lending import rpc
from tests.procs import ROOT, wait_for

pytestmark = pytest.mark.timeout(90)

MiB = 2**20
# Gemma 3 270M at n_ctx 512 as its load log reports it (see tests/gateway/test_placement.py).
GEMMA = ModelShape(18, int(4.2 * MiB), MiB // 2, 170 * MiB, 170 * MiB, 513 * MiB)
CHAT = {"model": "g", "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 8, "temperature": 0}


class Child:
    """A process whose merged output is read line by line in the background."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self.popen.stdout:
            for line in self.popen.stdout:
                self.lines.append(line)
                self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"no {pattern!r} in:\n{self.output}")

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def exit_code(self, timeout: float = 20) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.exit_code()


def start_worker(cache: Path) -> tuple[Child, str]:
    worker = Child("nodeagent.lending.rpcworker", "--port", "0", "--cache-dir", str(cache),
                   "--threads", "1")
    found = worker.wait_for(r"rpc worker listening on (127\.0\.0\.1:\d+) \(protocol (\S+),")
    return worker, found[1]


def start_runner(model: Path, sock: Path, *flags: str) -> Child:
    return Child("nodeagent.runner", "--model", str(model), "--id", "g", "--socket", str(sock),
                 "--n-ctx", "512", "--threads", "1", "--parallel", "1", *flags)


def client(sock: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://runner",
                        timeout=60)


def chat(sock: Path) -> tuple[str, str]:
    """(non-streamed content, streamed content) for the same greedy request."""
    with client(sock) as http:
        whole = http.post("/v1/chat/completions", json=CHAT).json()
        pieces = []
        with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    pieces.append(delta.get("content") or "")
    assert whole["usage"]["completion_tokens"] == 8
    return whole["choices"][0]["message"]["content"], "".join(pieces)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    cache = tmp_path_factory.mktemp("rpc-cache")
    started = [start_worker(cache / name) for name in ("a", "b")]
    yield [endpoint for _, endpoint in started]
    for worker, _ in started:
        worker.stop()


def test_worker_answers_hello_with_this_builds_version(workers: list[str]) -> None:
    host, port = workers[0].split(":")
    # llama_cpp is never imported here: it leaves /dev/null open, a ResourceWarning at exit.
    built = subprocess.run([sys.executable, "-c", "from nodeagent.lending import rpc; "
                            "print(rpc.supported(), rpc.protocol_version())"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert built.split() == ["True", "(7,", "0,", "0)"]
    assert rpc.probe(host, int(port), timeout=5) == (7, 0, 0)


def test_worker_refuses_any_host_but_loopback(tmp_path: Path) -> None:
    worker = Child("nodeagent.lending.rpcworker", "--host", "0.0.0.0", "--port", "0",
                   "--cache-dir", str(tmp_path))
    assert worker.exit_code() == 2
    assert "listen on 127.0.0.1 only" in worker.output


def load_record(runner: Child) -> dict[str, Any]:
    found = runner.wait_for(r"runner-load-record (\{.*\})")
    record: dict[str, Any] = json.loads(found[1])
    return record


def tiny_plan() -> Plan:
    def node(name: str, mib: int, has_model: bool = False) -> SplitNode:
        return SplitNode(name, has_model, (7, 0, 0), (Device("cpu", "CPU", mib * MiB),))

    plan = place(GEMMA, [node("head", 200, True), node("a", 750), node("b", 100)],
                 compute_bytes=20 * MiB)
    assert isinstance(plan, Plan) and plan.workers == ("b", "a")
    return plan


def test_planned_split_over_two_workers_then_one_gives_the_same_tokens(
        workers: list[str], model_path: Path, tmp_path: Path) -> None:
    plan, sock = tiny_plan(), tmp_path / "r.sock"
    two = start_runner(model_path, sock, "--rpc", workers[0], "--rpc", workers[1],
                       "--n-gpu-layers", str(plan.n_gpu_layers),
                       "--tensor-split", ",".join(f"{x:g}" for x in plan.tensor_split))
    try:
        record = load_record(two)
        two.wait_for("split verified")
        assert [(d["name"], d["description"], d["layers"]) for d in record["devices"]] == [
            ("CPU", "", [0, 1]), ("RPC0", workers[0], list(range(2, 8))),
            ("RPC1", workers[1], list(range(8, 19)))]
        for planned, loaded in zip(plan.devices, record["devices"], strict=True):
            assert loaded["layers"] == list(range(planned.first, planned.first + planned.count))
            used = loaded["weights_bytes"] + loaded["kv_bytes"] + loaded["compute_bytes"]
            assert used <= planned.need_bytes <= planned.free_bytes, (planned, loaded)
        _wait_healthy(sock, two)
        with client(sock) as http:
            assert http.get("/load").json() == record
        split_two, streamed = chat(sock)
        assert streamed == split_two
    finally:
        two.stop()
    one = start_runner(model_path, sock, "--rpc", workers[0], "--n-gpu-layers", "17",
                       "--tensor-split", "17")
    try:
        assert [d["layers"] for d in load_record(one)["devices"]] == [[0, 1],
                                                                      list(range(2, 19))]
        _wait_healthy(sock, one)
        split_one, _ = chat(sock)
    finally:
        one.stop()
    # Same layers on the head's CPU, the rest on rpc workers: the same greedy tokens.
    assert split_one == split_two and split_one


def _wait_healthy(sock: Path, runner: Child, timeout: float = 30) -> None:
    def healthy() -> bool:
        assert runner.popen.poll() is None, runner.output
        if not sock.exists():  # (httpx would leak the socket it failed to connect)
            return False
        try:
            with client(sock) as http:
                return http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, timeout, lambda: f"runner healthy:\n{runner.output}")


def test_unreachable_worker_fails_fast_with_a_clear_message(
        model_path: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    runner = start_runner(model_path, tmp_path / "r.sock", "--rpc", "127.0.0.1:9",
                          "--tensor-split", "1", "--probe-timeout", "2")
    assert runner.exit_code() == 1
    assert "runner[g]: rpc worker 127.0.0.1:9 cannot be reached: Connection refused" \
        in runner.output
    assert time.monotonic() - started < 15


def test_a_split_that_leaves_a_worker_idle_is_refused_before_loading(
        model_path: Path, tmp_path: Path) -> None:
    runner = start_runner(model_path, tmp_path / "r.sock", "--rpc", "127.0.0.1:9",
                          "--rpc", "127.0.0.1:10", "--tensor-split", "0,1")
    assert runner.exit_code() == 1
    assert "runner[g]: the split gives no layers to rpc worker(s) 127.0.0.1:9" in runner.output


def test_killing_a_worker_mid_stream_kills_the_runner(
        model_path: Path, tmp_path: Path) -> None:
    worker, endpoint = start_worker(tmp_path / "cache")
    sock = tmp_path / "r.sock"
    runner = start_runner(model_path, sock, "--rpc", endpoint, "--n-gpu-layers", "17",
                          "--tensor-split", "1")
    try:
        _wait_healthy(sock, runner)
        # A second head is refused by the probe: the worker answers one head at a time.
        other = start_runner(model_path, tmp_path / "o.sock", "--rpc", endpoint,
                             "--tensor-split", "1", "--probe-timeout", "1")
        assert other.exit_code() == 1
        assert f"rpc worker {endpoint} did not answer HELLO within 1 s" in other.output
        with client(sock) as http, http.stream(
                "POST", "/v1/chat/completions",
                json={**CHAT, "max_tokens": 32, "stream": True}) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            worker.popen.kill()
            with pytest.raises(httpx.TransportError):
                for _ in lines:
                    pass
        # ggml aborts the head on the failed round trip: SIGABRT, never a local fallback.
        assert runner.exit_code() == -signal.SIGABRT
        assert "Remote RPC server crashed" in runner.output
    finally:
        runner.stop()
        worker.stop()

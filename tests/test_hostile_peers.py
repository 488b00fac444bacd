"""Hostile peers, reproduced against real processes on 127.0.0.1.

- A man in the middle answers `myco node allow GATEWAY_ID --gateway URL` with the genuine
  gateway's certificate followed by its own: pairing must refuse, a node must refuse such a
  stored entry, and the attacker's certificate must reach no listener of the node.
- A head holding a lease floods the rpc worker's weight cache with SET_TENSOR (cache flag):
  the cache stays under the node's `rpc_cache_limit`, least recently used out first.
- The rpc worker's port answers nobody but the node's tunnel exit.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from myco.identity import Identity, load_or_create
from myco.tls import certificate_id, client_context, single_certificate
from nodeagent.lending import rpc
from tests.conftest import paired_state
from tests.procs import ROOT, Proc, myco, run_myco, wait_for

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]  # peers as processes: ~15 s
TENSOR = 16 * 1024  # four fit in the node's 64K weight cache


@pytest.fixture(scope="module")
def attacker(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return load_or_create(tmp_path_factory.mktemp("attacker"), "attacker")


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return load_or_create(tmp_path_factory.mktemp("head"), "head")


@contextlib.contextmanager
def mitm(certificate: str, gateway_id: str) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server answering /v1/identity with `certificate`; yields its URL and the paths
    it was asked for."""
    asked: list[str] = []
    body = json.dumps({"id": gateway_id, "certificate": certificate}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


KEY = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize("extra", ["{evil}", "{evil_tail}", "note\n", KEY])
def test_a_certificate_comes_alone(gateway_identity: Identity, attacker: Identity,
                                   extra: str) -> None:
    pem, evil = gateway_identity.pem(), attacker.pem()
    assert certificate_id("\n" + pem + "\n") == gateway_identity.id
    assert single_certificate(pem) == pem
    with pytest.raises(ValueError, match="exactly one PEM certificate and nothing else"):
        certificate_id(pem + extra.format(evil=evil, evil_tail=evil.split("\n", 1)[1]))


def allow(state: Path, gateway_id: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return run_myco("node", "allow", gateway_id, "--state-dir", str(state), *flags)


def test_pairing_through_a_man_in_the_middle_is_refused(
        tmp_path: Path, gateway_identity: Identity, attacker: Identity) -> None:
    genuine, evil = gateway_identity.pem(), attacker.pem()
    for smuggled in (genuine + evil, evil + genuine):
        with mitm(smuggled, gateway_identity.id) as (url, asked):
            result = allow(tmp_path, gateway_identity.id, "--gateway", url)
        assert asked == ["/v1/identity"]
        assert result.returncode == 1, result.stdout
        assert "myco: not paired: expected exactly one PEM certificate and nothing else, " \
               "found 2 PEM block(s)" in result.stderr
        assert not (tmp_path / "gateways.toml").exists()
    doubled = tmp_path / "doubled.pem"
    doubled.write_text(genuine + evil)
    assert allow(tmp_path, gateway_identity.id, "--cert", str(doubled)).returncode == 1
    assert not (tmp_path / "gateways.toml").exists()
    # The same path with the genuine certificate alone pairs: the refusal above is the PEM's.
    with mitm(genuine, gateway_identity.id) as (url, _):
        paired = allow(tmp_path, gateway_identity.id, "--gateway", url)
    assert paired.returncode == 0, paired.stderr
    stored = (tmp_path / "gateways.toml").read_text()
    assert stored.count("BEGIN CERTIFICATE") == 1 and gateway_identity.id in stored


def test_a_node_refuses_a_stored_entry_with_two_certificates(
        tmp_path: Path, gateway_identity: Identity, attacker: Identity) -> None:
    """gateways.toml as `myco node allow` wrote it for the man in the middle before the fix."""
    (tmp_path / "gateways.toml").write_text(
        f'["{gateway_identity.id}"]\nname = "mitm"\n'
        f"certificate = '''\n{gateway_identity.pem()}{attacker.pem()}'''\n")
    node = subprocess.Popen(
        [sys.executable, "-m", "mycoswarm.cli", "node", "--port", "0", "--state-dir", str(tmp_path),
         "--models", str(tmp_path)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        output, _ = node.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        node.kill()
        node.communicate()
        pytest.fail("the node started, trusting the certificate smuggled behind the gateway's")
    assert node.returncode == 2
    assert "exactly one PEM certificate and nothing else, found 2" in output


@pytest.fixture(scope="module")
def lender(tmp_path_factory: pytest.TempPathFactory,
           gateway_identity: Identity) -> Iterator[tuple[Proc, Path]]:
    """A node without models, paired with the session's gateway; its weight cache holds 64K."""
    state = paired_state(tmp_path_factory, gateway_identity)
    proc = myco("node", "--port", "0", "--name", "lender", "--state-dir", str(state),
                "--models", str(tmp_path_factory.mktemp("no-models")),
                env={"MYCO_NODE_RPC_CACHE_LIMIT": "64K", "MYCO_NODE_THREADS": "1"})
    yield proc, state
    proc.stop()


def lease(node: Proc, tls: ssl.SSLContext, head: Identity, pem: str = "") -> httpx.Response:
    return httpx.post(node.url + "/node/rpc/lease", verify=tls, timeout=30, json={
        "model": "m", "head_id": head.id, "head_certificate": pem or head.pem(),
        "device": "CPU"})


class Rpc:
    """ggml's RPC protocol (nodeagent/lending/rpc.py), as a head speaks it through the exit."""

    TENSOR = struct.Struct("<QIQ4I4II16ii10QQQQ64si")  # rpc_tensor, packed

    def __init__(self, port: int, identity: Identity) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = client_context(identity).wrap_socket(raw)

    def close(self) -> None:
        self.sock.close()

    def call(self, command: int, payload: bytes, reply: int | None) -> bytes:
        self.sock.sendall(struct.pack("<BQ", command, len(payload)) + payload)
        if reply is None:
            return b""
        size = struct.unpack("<Q", self._exactly(8))[0]
        assert size == reply
        return self._exactly(size)

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the tunnel closed the connection")
            data += chunk
        return data

    def hello(self) -> tuple[int, int, int]:
        major, minor, patch = self.call(14, bytes(24), 28)[:3]
        return major, minor, patch

    def buffer(self, size: int) -> tuple[int, int]:
        """A buffer on the worker's device: (remote pointer, base address)."""
        remote, _ = struct.unpack("<QQ", self.call(0, struct.pack("<IQ", 0, size), 16))
        (base,) = struct.unpack("<Q", self.call(3, struct.pack("<Q", remote), 8))
        return remote, base

    def tensor(self, remote: int, base: int, size: int) -> bytes:
        n = size // 4  # float32
        return self.TENSOR.pack(1, 0, remote, n, 1, 1, 1, 4, size, size, size, 0,
                                *[0] * 16, 0, *[0] * 10, 0, 0, base, b"w", 0)

    def set_tensor(self, tensor: bytes, data: bytes) -> None:
        self.call(6, tensor + struct.pack("<BQ", 1, 0) + data, None)  # cache flag set
        self.call(1, struct.pack("<I", 0), 8)  # GET_ALIGNMENT: the worker has read it all

    def set_tensor_hash(self, tensor: bytes, data: bytes) -> bool:
        return self.call(7, tensor + struct.pack("<QQ", 0, fnv1a(data)), 1) == b"\x01"


def fnv1a(data: bytes) -> int:
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


def test_the_attackers_certificate_reaches_no_listener_of_the_node(
        lender: tuple[Proc, Path], node_tls: ssl.SSLContext, gateway_identity: Identity,
        attacker: Identity, head: Identity) -> None:
    node, _ = lender
    info = httpx.get(node.url + "/node/info", verify=node_tls, timeout=10)
    assert info.status_code == 200  # the paired gateway is served
    with pytest.raises(httpx.ConnectError):  # refused in the TLS handshake
        httpx.get(node.url + "/node/info", verify=client_context(attacker), timeout=10)
    smuggled = lease(node, node_tls, head, head.pem() + attacker.pem())
    assert smuggled.status_code == 400
    assert "exactly one PEM certificate" in smuggled.json()["error"]["message"]
    granted = lease(node, node_tls, head)
    assert granted.status_code == 200, granted.text
    exit_port = granted.json()["tunnel_port"]
    with pytest.raises((ssl.SSLError, ConnectionError)):
        intruder = Rpc(exit_port, attacker)
        try:
            intruder.hello()
        finally:
            intruder.close()
    honest = Rpc(exit_port, head)
    try:
        assert honest.hello() == (7, 0, 0)
    finally:
        honest.close()


def test_the_worker_port_answers_only_the_tunnel_exit(
        lender: tuple[Proc, Path], node_tls: ssl.SSLContext, head: Identity) -> None:
    node, _ = lender
    granted = lease(node, node_tls, head).json()
    with pytest.raises(rpc.RpcError):  # any local process: refused
        rpc.probe("127.0.0.1", granted["worker_port"], timeout=2)
    through = Rpc(granted["tunnel_port"], head)
    try:
        assert through.hello() == (7, 0, 0)
    finally:
        through.close()


def test_the_weight_cache_stays_under_its_limit_least_recently_used_out_first(
        lender: tuple[Proc, Path], node_tls: ssl.SSLContext, head: Identity) -> None:
    node, state = lender
    root = state / "rpc-cache"

    data = [bytes([i]) * TENSOR for i in range(64)]
    names = [f"{fnv1a(d):016x}" for d in data]  # ggml's file names

    def cached() -> set[int]:
        """The tensors cached (found without opening a file: that would count as a use)."""
        present = {path.name for path in root.rglob("*")}
        return {i for i, name in enumerate(names) if name in present}

    granted = lease(node, node_tls, head)
    assert granted.status_code == 200, granted.text
    client = Rpc(granted.json()["tunnel_port"], head)
    try:
        assert client.hello() == (7, 0, 0)
        tensor = client.tensor(*client.buffer(TENSOR), TENSOR)
        for i in range(4):
            client.set_tensor(tensor, data[i])
        wait_for(lambda: cached() == {0, 1, 2, 3}, 5, lambda: f"cached: {cached()}")
        assert client.set_tensor_hash(tensor, data[0])  # a hit: tensor 0 was used last
        for i in (4, 5):
            client.set_tensor(tensor, data[i])
        wait_for(lambda: cached() == {0, 3, 4, 5}, 5, lambda: f"cached: {cached()}")
        started = time.monotonic()
        for i in range(6, 64):  # as fast as the worker takes them
            client.set_tensor(tensor, data[i])
        flood = time.monotonic() - started
        wait_for(lambda: cached() == {60, 61, 62, 63}, 5, lambda: f"cached: {cached()}")
        total = sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
        print(f"{58 * TENSOR} bytes sent in {flood:.2f} s; {total} bytes cached")
        assert total <= 64 * 1024
        # In the head's own directory: no other head can plant a file under a hash it asks for.
        assert {path.name for path in (root / head.id).iterdir()} == set(names[60:])
    finally:
        client.close()

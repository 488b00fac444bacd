"""llama.cpp's RPC backend: the ctypes glue for workers and heads, and a pure-socket probe.

Every ggml function is reached through the library llama-cpp-python itself loaded
(`llama_cpp.llama_cpp._lib`, which resolves the symbols of its ggml dependencies) and the RPC
backend's registry entry, as llama.cpp's own `--rpc` flag does.  Loading libggml.so by path would
give a second, empty device registry whose devices the model never uses.

Worker side: `serve_worker` serves one device (the CPU, or a GPU by name) and blocks; run it in a
process of its own (`python -m nodeagent.lending.rpcworker`).  Head side (a runner): `probe` every
worker, then `add_servers` before the model is loaded; the devices are named RPC0, RPC1, ... in that
order.  A head aborts (SIGABRT) when a worker is unreachable at registration or dies later, so it
must be a supervised child process, and workers must be probed first.

The protocol version: the RPC library exposes no symbol for it; `protocol_version` reads the
RPC_PROTO_*_VERSION constants from the ggml-rpc.h that the same llama-cpp-python wheel installed,
and `probe` reads it from a worker's HELLO reply (the worker's ready line shows that one).
The wire format of HELLO (ggml/src/ggml-rpc/ggml-rpc.cpp, protocol 7): the client sends
command byte 14, a u64 request size (24) and 24 bytes of transport capabilities (zeros: plain
TCP); the server answers a u64 size (28), then major, minor, patch, a pad byte and 24 bytes of
capabilities.  Sizes are little-endian.  ggml accepts a worker of the same major version and
a minor version no newer than its own; we ask for the same version (the patch number tracks
ggml's operation table, which both ends must share).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from myco.protocol import RpcVersion

_HELLO, _CAPS = 14, 24
_DEVICE_CPU = 0  # GGML_BACKEND_DEVICE_TYPE_CPU
_P = ctypes.c_void_p


class RpcError(RuntimeError):
    """A worker cannot be reached, speaks something else, or RPC is missing from this build."""


def version_text(version: RpcVersion) -> str:
    return ".".join(map(str, version))


def probe(host: str, port: int, timeout: float) -> RpcVersion:
    """The worker's protocol version, from a HELLO handshake; RpcError if it does not answer
    within `timeout` seconds (a worker busy with another head accepts, then never answers)."""
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("<BQ", _HELLO, _CAPS) + bytes(_CAPS))
            reply = b""
            while len(reply) < 8 + 4 + _CAPS and (chunk := sock.recv(64)):
                reply += chunk
    except TimeoutError:
        raise RpcError(f"rpc worker {where} did not answer HELLO within {timeout:g} s "
                       "(busy with another head, or not an rpc worker)") from None
    except OSError as exc:
        raise RpcError(f"rpc worker {where} cannot be reached: {exc.strerror or exc}") from None
    if not reply:
        raise RpcError(f"rpc worker {where} hung up at HELLO (another protocol version?)")
    if len(reply) < 12 or struct.unpack_from("<Q", reply)[0] != 4 + _CAPS:
        raise RpcError(f"{where} is not an rpc worker of a known protocol (reply {reply[:12]!r})")
    return reply[8], reply[9], reply[10]


def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    """A ggml function, typed without touching the shared library object's attributes."""
    from llama_cpp import llama_cpp  # the node's extra; never imported by the gateway

    return ctypes.CFUNCTYPE(restype, *argtypes)((name, llama_cpp._lib))


def _registry_fn(name: str, restype: Any, *argtypes: Any) -> Any:
    reg = _fn("ggml_backend_reg_by_name", _P, ctypes.c_char_p)(b"RPC")
    address = reg and _fn("ggml_backend_reg_get_proc_address", _P, _P, ctypes.c_char_p)(
        reg, name.encode())
    if not address:
        raise RpcError("this llama-cpp-python was built without RPC (-DGGML_RPC=on)")
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def supported() -> bool:
    """Whether llama-cpp-python is installed and its build has the RPC backend."""
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_rpc()) and bool(
        _fn("ggml_backend_reg_by_name", _P, ctypes.c_char_p)(b"RPC"))


def protocol_version() -> RpcVersion | None:
    """The RPC protocol this build speaks (None without RPC), from its installed ggml-rpc.h."""
    if not supported():
        return None
    files = metadata.files("llama_cpp_python") or []
    if (header := next((f for f in files if f.name == "ggml-rpc.h"), None)) is None:
        return None
    text = header.read_text()
    parts = [re.search(rf"#define\s+RPC_PROTO_{p}_VERSION\s+(\d+)", text)
             for p in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    major, minor, patch = (int(m.group(1)) for m in parts if m)
    return major, minor, patch


def device_names() -> list[str]:
    """Every ggml device of this process (CPU, CUDA0, ..., and RPC devices once added)."""
    get = _fn("ggml_backend_dev_get", _P, ctypes.c_size_t)
    name = _fn("ggml_backend_dev_name", ctypes.c_char_p, _P)
    return [name(get(i)).decode() for i in range(_fn("ggml_backend_dev_count", ctypes.c_size_t)())]


def serve_worker(host: str, port: int, cache_dir: str, threads: int, device: str = "CPU") -> None:
    """Serve `device` ("CPU", or a GPU such as "CUDA0") to one head at a time; blocks forever.
    Creates `cache_dir` (ggml does not, and then drops cached weights silently).  Refuses a
    host that is not loopback: the protocol has no authentication.  RpcError if the device does
    not exist or the server could not listen (it returns only then)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise RpcError(f"refusing to serve RPC on {host}: workers listen on a loopback IP address")
    dev = _fn("ggml_backend_dev_by_type", _P, ctypes.c_int)(_DEVICE_CPU) if device == "CPU" \
        else _fn("ggml_backend_dev_by_name", _P, ctypes.c_char_p)(device.encode())
    if not dev:
        raise RpcError(f"no device {device!r}; this build has {', '.join(device_names())}")
    os.makedirs(cache_dir, exist_ok=True)
    start = _registry_fn("ggml_backend_rpc_start_server", None, ctypes.c_char_p,
                         ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(_P))
    start(f"{host}:{port}".encode(), os.fsencode(cache_dir), threads, 1, (_P * 1)(dev))
    raise RpcError(f"could not serve RPC on {host}:{port} (port in use?)")


def add_servers(endpoints: Sequence[str]) -> list[str]:
    """Register each worker ("host:port") with ggml, in order, for models loaded afterwards in
    this process; returns the device names they got (RPC0, RPC1, ...).
    Probe the workers first: an unreachable one aborts this process inside ggml.
    ValueError on a repeated endpoint (ggml would list its devices twice)."""
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"an rpc worker is listed twice: {list(endpoints)}")
    add = _registry_fn("ggml_backend_rpc_add_server", _P, ctypes.c_char_p)
    register = _fn("ggml_backend_register", None, _P)
    count = _fn("ggml_backend_reg_dev_count", ctypes.c_size_t, _P)
    get = _fn("ggml_backend_reg_dev_get", _P, _P, ctypes.c_size_t)
    name = _fn("ggml_backend_dev_name", ctypes.c_char_p, _P)
    names: list[str] = []
    for endpoint in endpoints:
        if not (reg := add(endpoint.encode())):
            raise RpcError(f"rpc worker {endpoint} offers no devices")
        register(reg)
        names += [name(get(reg, i)).decode() for i in range(count(reg))]
    return names

"""`python -m nodeagent.lending.rpcworker --port P --cache-dir D [--threads N] [--device NAME]
[--control-fd FD]`.

Lends one device of this machine to a llama.cpp head over the RPC protocol, on 127.0.0.1 only
(the protocol has no authentication: other hosts reach it through the node agents' encrypted
channel).  When it answers, it prints one line for its supervisor to wait for:

    rpc worker listening on 127.0.0.1:PORT (protocol 7.0.0, device CPU, private network)

With `--control-fd` (a Unix socket from the node agent) it first moves to a network namespace
of its own, and answers each byte read on that socket with a new TCP socket of that namespace
(SCM_RIGHTS), for the agent to connect to the port no other process can reach (ggml's server
binds TCP itself and sets TCP_NODELAY on what it accepts: a Unix socket cannot stand in).  Where
Linux allows no such namespace (not root, no user namespaces), it warns and serves on the host.

`--port 0` lets the system pick a free port: ggml cannot report the port it bound, so we find our
own listening socket with psutil, then confirm it with a HELLO probe.  Exit status 1 when the server
cannot start (port in use, unknown device), 2 on bad arguments.  ggml itself prints a banner and
"Accepted client connection" lines on stdout.  It dies with its parent (nodeagent/child.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import psutil

from nodeagent import child
from nodeagent.lending import rpc

HOST = "127.0.0.1"
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_SIOCSIFFLAGS, _IFF_UP, _IFF_LOOPBACK = 0x8914, 0x1, 0x8


def _listening_port(port: int) -> int | None:
    """Our process's listening port on HOST (`port`, or any when 0), if it has one yet."""
    return next((int(c.laddr.port) for c in psutil.Process().net_connections(kind="tcp4")
                 if c.status == psutil.CONN_LISTEN and c.laddr.ip == HOST
                 and port in (0, c.laddr.port)), None)


def _isolate() -> int:
    """Move to a new network namespace with its loopback up; 0, or the errno that stopped it."""
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNET | (0 if os.geteuid() == 0 else _CLONE_NEWUSER)
    try:
        if ctypes.CDLL(None, use_errno=True).unshare(flags) != 0:
            return ctypes.get_errno()
        if flags & _CLONE_NEWUSER:  # files stay ours
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
            Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
        with socket.socket() as sock:
            fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", _IFF_UP | _IFF_LOOPBACK))
    except OSError as exc:
        return exc.errno or 1
    return 0


def _private_network() -> str | None:
    """None once this process has a network of its own, else why not (nothing changed).
    Call it before any thread starts: a user namespace needs a single thread."""
    if sys.platform != "linux":
        return f"no network namespaces on {sys.platform}"
    if (pid := os.fork()) == 0:  # a trial run first: a half-done move could not be undone
        os._exit(_isolate())
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    error = _isolate() if status == 0 else status
    return os.strerror(error) if error else None


def _hand_out(control: socket.socket) -> None:
    """Answer each byte read on `control` with a new TCP socket; end with the agent."""
    with contextlib.suppress(OSError):
        while control.recv(1):
            with socket.socket() as sock:
                socket.send_fds(control, [b"s"], [sock.fileno()])
    os._exit(0)  # the agent closed the socket (the lease ended) or is gone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.lending.rpcworker")
    parser.add_argument("--host", default=HOST, help="must be 127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0: any free port")
    parser.add_argument("--cache-dir", required=True, help="weights received, kept for reuse")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="CPU", help="CPU, or a GPU such as CUDA0")
    parser.add_argument("--ready-timeout", type=float, default=30.0)
    parser.add_argument("--control-fd", type=int, help="serve sockets of a private network")
    args = parser.parse_args(argv)
    if args.host != HOST:
        parser.error(f"refusing to listen on {args.host}: rpc workers listen on {HOST} only")
    why = _private_network() if args.control_fd is not None else "no --control-fd"
    child.die_with_parent()
    if args.control_fd is not None and why is not None:
        print(f"rpcworker: warning: every local process can reach this worker's port, as a "
              f"network namespace of its own is not allowed here: {why}", file=sys.stderr)

    failure: list[BaseException] = []

    def serve() -> None:
        try:
            rpc.serve_worker(HOST, args.port, args.cache_dir, args.threads, args.device)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    server = threading.Thread(target=serve, name="rpc-server", daemon=True)
    server.start()
    deadline = time.monotonic() + args.ready_timeout
    while (port := _listening_port(args.port)) is None:
        if not server.is_alive() or time.monotonic() > deadline:
            sys.exit(f"rpcworker: {failure[0] if failure else 'did not start listening'}")
        time.sleep(0.02)
    try:
        version = rpc.probe(HOST, port, timeout=args.ready_timeout)
    except rpc.RpcError as exc:
        sys.exit(f"rpcworker: {exc}")
    if args.control_fd is not None:
        control = socket.socket(fileno=args.control_fd)
        threading.Thread(target=_hand_out, args=(control,), daemon=True).start()
    print(f"rpc worker listening on {HOST}:{port} (protocol {rpc.version_text(version)}, "
          f"device {args.device}, {'host' if why else 'private'} network)", flush=True)
    try:
        server.join()
    except KeyboardInterrupt:
        raise SystemExit(0) from None
    sys.exit(f"rpcworker: {failure[0] if failure else 'stopped'}")


if __name__ == "__main__":
    main()

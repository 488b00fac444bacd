"""`python -m nodeagent.rpcworker --port P --cache-dir D [--threads N] [--device NAME]`.

Lends one device of this machine to a llama.cpp head over the RPC protocol, on 127.0.0.1 only
(the protocol has no authentication: other hosts reach it through the node agents' encrypted
channel).  When it answers, it prints one line for its supervisor to wait for:

    rpc worker listening on 127.0.0.1:PORT (protocol 7.0.0, device CPU)

`--port 0` lets the system pick a free port: ggml cannot report the port it bound, so we find
our own listening socket with psutil, then confirm it with a HELLO probe.  Exit status 1 when
the server cannot start (port in use, unknown device), 2 on bad arguments.  ggml itself prints
a banner and "Accepted client connection" lines on stdout.  It dies with the process that
started it (nodeagent/child.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import psutil

from nodeagent import child, rpc

HOST = "127.0.0.1"


def _listening_port(port: int) -> int | None:
    """Our process's listening port on HOST (`port`, or any when 0), if it has one yet."""
    for conn in psutil.Process().net_connections(kind="tcp4"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == HOST \
                and (port == 0 or conn.laddr.port == port):
            return int(conn.laddr.port)
    return None


def main(argv: list[str] | None = None) -> None:
    child.die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m nodeagent.rpcworker")
    parser.add_argument("--host", default=HOST, help="must be 127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0: any free port")
    parser.add_argument("--cache-dir", required=True, help="weights received, kept for reuse")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="CPU", help="CPU, or a GPU such as CUDA0")
    parser.add_argument("--ready-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.host != HOST:
        parser.error(f"refusing to listen on {args.host}: rpc workers listen on {HOST} only")

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
    print(f"rpc worker listening on {HOST}:{port} (protocol {rpc.version_text(version)}, "
          f"device {args.device})", flush=True)
    try:
        server.join()
    except KeyboardInterrupt:
        raise SystemExit(0) from None
    sys.exit(f"rpcworker: {failure[0] if failure else 'stopped'}")


if __name__ == "__main__":
    main()

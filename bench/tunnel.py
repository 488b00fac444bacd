"""What the RPC tunnel adds: direct TCP to a stand-in rpc server vs through entrance -> exit.

`python -m bench.tunnel [--quick] [--json]` runs three processes, as on two hosts: this one
(llama.cpp's side), a head process (the `TunnelEntrance`) and a worker process (the
`TunnelExit` and a stand-in rpc server that reads a request and answers with the bytes asked
for).  Interleaved round by round, so this shared machine's noise hits both sides alike:

- round trips of 64-byte request -> 64-byte reply over one connection (RPC's per-graph
  exchange): p50, p99, added;
- bulk upload, one request of many MiB answered by 8 bytes (weights at load time): MB/s.

Everything shares this machine's cores and runs over loopback, so the tunnel's added latency
is CPU time (two TLS hops), not network time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from myco.identity import load_or_create
from nodeagent.lending.tunnel import TunnelEntrance, TunnelExit

HEADER = struct.Struct("!QQ")  # request bytes that follow, reply bytes wanted
TARGETS = {"added_p50_ms": 0.25, "tunnel_mb_s": 117}  # 117 MB/s: gigabit Ethernet's payload


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            size, reply = HEADER.unpack(await reader.readexactly(HEADER.size))
            while size:
                size -= len(await reader.read(min(size, 1 << 20)))
            writer.write(b"r" * reply)
            await writer.drain()
    writer.close()


async def until_stdin_closes() -> None:
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()


async def worker(state: Path) -> None:
    """The worker host: the stand-in rpc server on 127.0.0.1 and the exit in front of it."""
    head, me = load_or_create(state / "head", "head"), load_or_create(state / "worker", "worker")
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    rpc_port = server.sockets[0].getsockname()[1]
    async with TunnelExit(me) as exit_:
        await exit_.start("127.0.0.1")
        exit_.grant(head.id, Path(head.cert_path).read_text(), rpc_port)
        print(rpc_port, exit_.port, flush=True)
        await until_stdin_closes()
    server.close()


async def head(state: Path, exit_port: int) -> None:
    """The head host: the entrance, pinned to the worker's id."""
    me, worker_ = load_or_create(state / "head", "head"), load_or_create(state / "worker", "worker")
    async with TunnelEntrance(me, "127.0.0.1", exit_port, worker_.id) as entrance:
        print(await entrance.start(), flush=True)
        await until_stdin_closes()


def spawn(*args: str) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.tunnel", *args], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, [int(port) for port in proc.stdout.readline().split()]


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def exchange(self, body: bytes, reply: int) -> None:
        self.writer.write(HEADER.pack(len(body), reply))
        for i in range(0, len(body), 1 << 20):
            self.writer.write(body[i:i + (1 << 20)])
            await self.writer.drain()
        await self.reader.readexactly(reply)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def measure(ports: dict[str, int], rounds: int, per_round: int, bulk_mib: int,
                  bulk_rounds: int) -> dict[str, float]:
    conns = {side: Conn(*await asyncio.open_connection("127.0.0.1", port))
             for side, port in ports.items()}
    small, bulk = b"q" * 64, b"w" * (bulk_mib << 20)
    rtt: dict[str, list[float]] = {side: [] for side in conns}
    rate: dict[str, list[float]] = {side: [] for side in conns}
    for conn in conns.values():  # warm up: handshake, first allocations
        await conn.exchange(small, 64)
    for _ in range(rounds):
        for side, conn in conns.items():
            for _ in range(per_round):
                started = time.perf_counter()
                await conn.exchange(small, 64)
                rtt[side].append((time.perf_counter() - started) * 1000)
    for _ in range(bulk_rounds):
        for side, conn in conns.items():
            started = time.perf_counter()
            await conn.exchange(bulk, 8)
            rate[side].append(len(bulk) / 1e6 / (time.perf_counter() - started))
    for conn in conns.values():
        conn.writer.close()
        await conn.writer.wait_closed()
    out = {f"{side}_p{p}_ms": pct(rtt[side], p) for side in conns for p in (50, 99)}
    out |= {f"{side}_mb_s": pct(rate[side], 50) for side in conns}
    out["added_p50_ms"] = out["tunnel_p50_ms"] - out["direct_p50_ms"]
    out["added_p99_ms"] = out["tunnel_p99_ms"] - out["direct_p99_ms"]
    out["rtt_ratio_p50"] = out["tunnel_p50_ms"] / out["direct_p50_ms"]
    out["throughput_ratio"] = out["tunnel_mb_s"] / out["direct_mb_s"]
    out["round_trips"] = rounds * per_round
    out["bulk_mib"] = bulk_mib
    return out


def report(m: dict[str, float]) -> str:
    return "\n".join([
        f"round trips, 64 B -> 64 B, {m['round_trips']:.0f} per side, interleaved:",
        f"  direct  p50 {m['direct_p50_ms']:.3f} ms  p99 {m['direct_p99_ms']:.3f} ms",
        f"  tunnel  p50 {m['tunnel_p50_ms']:.3f} ms  p99 {m['tunnel_p99_ms']:.3f} ms",
        f"  added   p50 {m['added_p50_ms']:.3f} ms  p99 {m['added_p99_ms']:.3f} ms  "
        f"(x{m['rtt_ratio_p50']:.2f}; target <= {TARGETS['added_p50_ms']} ms)",
        f"bulk upload, {m['bulk_mib']:.0f} MiB per sample, median:",
        f"  direct  {m['direct_mb_s']:.0f} MB/s",
        f"  tunnel  {m['tunnel_mb_s']:.0f} MB/s  (x{m['throughput_ratio']:.2f}; "
        f"target >= {TARGETS['tunnel_mb_s']} MB/s)",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (about a second)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--role", choices=["worker", "head"], help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--exit-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "worker":
        return asyncio.run(worker(Path(args.state)))
    if args.role == "head":
        return asyncio.run(head(Path(args.state), args.exit_port))
    with tempfile.TemporaryDirectory() as state:
        for name in ("head", "worker"):
            load_or_create(Path(state) / name, name)
        worker_proc, (rpc_port, exit_port) = spawn("--role", "worker", "--state", state)
        head_proc, (entrance_port,) = spawn("--role", "head", "--state", state,
                                            "--exit-port", str(exit_port))
        try:
            shape = (5, 40, 8, 2) if args.quick else (20, 250, 64, 5)
            measured = asyncio.run(measure({"direct": rpc_port, "tunnel": entrance_port},
                                           *shape))
        finally:
            for proc in (head_proc, worker_proc):
                proc.communicate(timeout=10)
    print(json.dumps(measured) if args.json else report(measured))


if __name__ == "__main__":
    main()

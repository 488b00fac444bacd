"""What the gateway adds: direct to a fast fake upstream vs through one gateway process.

`python -m bench.gateway_overhead [--quick] [--json]` starts bench/fake_upstream.py (answers
instantly) twice -- once plain HTTP, once serving mutual TLS as a node does -- and `myco
gateway` in front of both (the plain one listed as an upstream, the TLS one as a node), then
measures three sides in one run, interleaved round by round so the noise of this shared
machine hits them alike: direct (plain), through the gateway to the plain upstream, and
through the gateway over pinned mutual TLS to the node (keep-alive: the handshake is paid once
per pooled connection, so what remains is the per-request encryption):

- sequential non-streaming latency over one keep-alive connection (p50, p99, added);
- streaming, 16 SSE chunks, time to the last byte (p50, p99, added);
- requests/s at 16 concurrent keep-alive connections.

The load generator is a minimal asyncio HTTP/1.1 client (httpx would be the bottleneck).
Client, gateway and upstream share this machine's cores; the numbers are what they are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from myco.identity import load_or_create
from tests.procs import Proc, fake_upstream, myco


def body(model: str, stream: bool = False) -> bytes:
    message: dict[str, object] = {"model": model,
                                  "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        message["stream"] = True
    return json.dumps(message, separators=(",", ":")).encode()

TARGETS = {"added_p50_ms": 0.5, "added_p50_stream_ms": 1.0, "gateway_rps": 2000}


def request(host: str, body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json"
            b"\r\ncontent-length: %d\r\n\r\n" % (host.encode(), len(body))) + body


class Conn:
    """One keep-alive connection that sends a prepared request and reads the whole answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, address: str) -> Conn:
        host, port = address.rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def exchange(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers = head.lower()
        if b"transfer-encoding: chunked" in headers:
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            length = int(headers.split(b"content-length:")[1].split(b"\r\n")[0])
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def latencies(address: str, raw: bytes, n: int, errors: list[int]) -> list[float]:
    conn = await Conn.open(address)
    out = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            status = await conn.exchange(raw)
            out.append((time.perf_counter() - started) * 1000)
            if status != 200:
                errors.append(status)
    finally:
        conn.close()
    return out


async def throughput(address: str, raw: bytes, conns: int, seconds: float,
                     errors: list[int]) -> float:
    deadline = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        conn = await Conn.open(address)
        try:
            while time.perf_counter() < deadline:
                if await conn.exchange(raw) != 200:
                    errors.append(1)
                done += 1
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    return done / (time.perf_counter() - started)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def measure(sides: dict[str, tuple[str, str]], quick: bool) -> dict[str, object]:
    """`sides`: name -> (address to send to, model to ask for); "direct" is the baseline."""
    rounds, per_round, seconds = (3, 100, 1.0) if quick else (20, 150, 3.0)
    errors: list[int] = []
    seq: dict[str, list[float]] = {k: [] for k in sides}
    stream: dict[str, list[float]] = {k: [] for k in sides}
    rps: dict[str, list[float]] = {k: [] for k in sides}
    plain = {side: request(a, body(m)) for side, (a, m) in sides.items()}
    streamed = {side: request(a, body(m, stream=True)) for side, (a, m) in sides.items()}
    for side, (address, _) in sides.items():  # warm up every path
        await latencies(address, plain[side], 50, errors)
    for _ in range(rounds):
        for side, (address, _) in sides.items():
            seq[side] += await latencies(address, plain[side], per_round, errors)
            stream[side] += await latencies(address, streamed[side], per_round // 2, errors)
    for _ in range(3 if not quick else 1):
        for side, (address, _) in sides.items():
            rps[side].append(await throughput(address, plain[side], 16, seconds, errors))
    result: dict[str, object] = {"cores": os.cpu_count(), "errors": len(errors)}
    for name, data in (("seq", seq), ("stream", stream)):
        for side in sides:
            result[f"{name}_{side}_p50_ms"] = round(pct(data[side], 50), 3)
            result[f"{name}_{side}_p99_ms"] = round(pct(data[side], 99), 3)
            if side != "direct":
                for p in (50, 99):
                    result[f"{name}_{side}_added_p{p}_ms"] = round(
                        pct(data[side], p) - pct(data["direct"], p), 3)
    for side in sides:
        result[f"rps_{side}"] = round(statistics.median(rps[side]))
    return result


def report(r: dict[str, object]) -> str:
    def ok(value: object, limit: float, above: bool = False) -> str:
        good = float(value) >= limit if above else float(value) <= limit  # type: ignore[arg-type]
        return "meets" if good else "MISSES"

    lines = [f"gateway overhead: {r['cores']} cores shared by load generator, gateway and "
             f"upstreams; {r['errors']} non-200 answers",
             "                                  p50 /    p99 ms   added p50 / p99 ms   req/s "
             "(16 conns)"]
    for kind, label in (("seq", "non-streaming"), ("stream", "streaming, 16 chunks")):
        for side in ("direct", "gateway", "mtls"):
            added = "" if side == "direct" else \
                f"{r[f'{kind}_{side}_added_p50_ms']:>9} /{r[f'{kind}_{side}_added_p99_ms']:>7}"
            rps = r[f"rps_{side}"] if kind == "seq" else ""
            lines.append(f"{label + ' ' + side:<30}{r[f'{kind}_{side}_p50_ms']:>7} /"
                         f"{r[f'{kind}_{side}_p99_ms']:>7}   {added:<19}  {rps}")
    tls = float(r["seq_mtls_p50_ms"]) - float(r["seq_gateway_p50_ms"])  # type: ignore[arg-type]
    lines += [
        f"mutual TLS to the node costs {tls:.3f} ms p50 per request over plain HTTP",
        "targets: added p50 <= 0.5 ms non-streaming, plain "
        f"({ok(r['seq_gateway_added_p50_ms'], 0.5)}) and mutual TLS "
        f"({ok(r['seq_mtls_added_p50_ms'], 0.5)}); <= 1 ms streaming "
        f"({ok(r['stream_mtls_added_p50_ms'], 1.0)}); >= 2000 req/s through the gateway "
        f"({ok(r['rps_mtls'], 2000, above=True)} over mutual TLS)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    procs: list[Proc] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            identity = load_or_create(Path(tmp) / "gateway", "bench gateway")
            plain = fake_upstream("plain", "plain-model")
            procs.append(plain)
            node = fake_upstream("node", "node-model", node_for=identity)
            procs.append(node)
            policy = Path(tmp) / "policy.toml"
            policy.write_text(f"""
[nodes.node]
address = "{node.address}"
id = "{node.node_id}"
[upstreams.plain]
url = "{plain.url}/v1"
cloud = false
[[routes]]
match = {{ model = "plain-*" }}
forward = ["plain"]
[[routes]]
match = {{ model = "*" }}
forward = ["node"]
""")
            gateway = myco("gateway", "--policy", str(policy), "--port", "0", "--audit-log",
                           str(Path(tmp) / "audit.jsonl"), "--state-dir",
                           str(Path(tmp) / "gateway"))
            procs.append(gateway)
            runner: Callable[..., dict[str, object]] = asyncio.run
            try:  # the gateway runs on uvloop when installed; so does its load
                import uvloop

                runner = uvloop.run
            except ImportError:
                pass
            sides = {"direct": (plain.address, "plain-model"),
                     "gateway": (gateway.address, "plain-model"),
                     "mtls": (gateway.address, "node-model")}
            result = runner(measure(sides, args.quick))
    finally:
        for proc in procs:
            proc.stop()
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()

"""Many streams at once: aggregate decode tokens/s and time to first token at 1, 4 and 8
concurrent streams, three ways on the same model, threads and context per slot:

- swarm: `myco up` (gateway -> node agent -> runner with `--parallel N` slots, engine.py);
- one-at-a-time: plain llama-cpp-python `Llama.create_completion` in this process, one
  stream at a time (the runner's path before slots), streams waiting their turn;
- llama-server: llama.cpp's own server, `--parallel N`, built from the llama.cpp source the
  llama-cpp-python sdist vendors (bench/build-llama-server.sh; bench-only).

`python -m bench.parallel [--streams 1,4,8] [--tokens 64] [--rounds 3] [--slots 4]
[--threads T] [--json]`.  Each stream is a /v1/completions request with its own prompt,
temperature 0, `max_tokens` tokens; a token is a streamed piece of text.  Rounds interleave
the three so the noise of this shared machine hits them alike; the median and range of the
rounds are printed, with the issue's targets: swarm single stream >= 0.9 of llama-server's,
at 4 streams >= 0.8 of llama-server's aggregate and >= 1.5x the swarm's own single stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from nodeagent.hardware import default_threads
from nodeagent.store import default_models_dir

MODEL = "gemma-3-270m-q4_k_m"
Result = tuple[float, float, int]  # (seconds to first token, seconds to last, tokens)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prompt(i: int) -> str:
    return f"Story number {i}: once upon a time, in a village by the sea,"


async def http_stream(client: httpx.AsyncClient, i: int, tokens: int) -> Result:
    started, first, n = time.perf_counter(), 0.0, 0
    async with client.stream("POST", "/completions", json={
            "model": MODEL, "prompt": prompt(i), "max_tokens": tokens, "temperature": 0,
            "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            choices = json.loads(line[6:])["choices"] if line.startswith("data: {") else []
            if choices and choices[0].get("text"):
                n += 1
                first = first or time.perf_counter() - started
    return first, time.perf_counter() - started, n


def local_streams(llm: Any, lock: threading.Lock) -> Callable[[int, int], Awaitable[Result]]:
    """Today's one-at-a-time path: each stream waits for the model, then streams alone."""
    def one(i: int, tokens: int, started: float) -> Result:
        first, n = 0.0, 0
        with lock:
            for piece in llm.create_completion(prompt(i), max_tokens=tokens, temperature=0,
                                               stream=True):
                if piece["choices"][0]["text"]:
                    n += 1
                    first = first or time.perf_counter() - started
        return first, time.perf_counter() - started, n

    async def run(i: int, tokens: int) -> Result:
        return await asyncio.to_thread(one, i, tokens, time.perf_counter())
    return run


async def measure(stream: Callable[[int, int], Awaitable[Result]], n: int,
                  tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    results = await asyncio.gather(*(stream(i, tokens) for i in range(n)))
    wall = time.perf_counter() - started
    return {"tok_s": sum(r[2] for r in results) / wall,
            "ttft_ms": statistics.median(r[0] for r in results) * 1000}


def wait_http(url: str, timeout: float = 120) -> None:
    """Until `url` answers 200 (a gateway's /health: with every node healthy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(url, timeout=2)
            if answer.status_code == 200 and all(answer.json().get("nodes", {}).values()):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def start(args: argparse.Namespace, model: Path, state: Path) -> list[subprocess.Popen[bytes]]:
    server = subprocess.run(["bash", "bench/build-llama-server.sh", sys.executable], check=True,
                            capture_output=True, text=True).stdout.strip()
    args.server_port, args.gateway_port, node_port = free_port(), free_port(), free_port()
    policy = state / "policy.toml"
    policy.write_text(f'[nodes.local]\naddress = "127.0.0.1:{node_port}"\n'
                      '[[routes]]\nforward = ["local"]\n')
    env = {**os.environ, "MYCO_NODE_PARALLEL": str(args.slots),
           "MYCO_NODE_THREADS": str(args.threads), "MYCO_NODE_N_CTX": str(args.n_ctx),
           "XDG_STATE_HOME": str(state), "MYCO_MODELS": str(model.parent)}
    procs = [
        subprocess.Popen([server, "-m", str(model), "--port", str(args.server_port),
                          "--parallel", str(args.slots), "-t", str(args.threads), "-tb",
                          str(args.threads), "-c", str(args.n_ctx * args.slots), "--no-webui",
                          "-np", str(args.slots)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "mycoswarm.cli", "up", "--port",
                          str(args.gateway_port), "--node-port", str(node_port), "--policy",
                          str(policy)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_http(f"http://127.0.0.1:{args.server_port}/health")
        wait_http(f"http://127.0.0.1:{args.gateway_port}/health")
    except BaseException:
        stop(procs)
        raise
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
        proc.wait(10)


async def bench(args: argparse.Namespace, llm: Any) -> dict[str, dict[int, list[float]]]:
    found: dict[str, dict[int, list[float]]] = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.gateway_port}/v1",
                                 timeout=600) as ours, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.server_port}/v1",
                              timeout=600) as theirs:
        sides: dict[str, Callable[[int, int], Awaitable[Result]]] = {
            "swarm": lambda i, t: http_stream(ours, i, t),
            "llama-server": lambda i, t: http_stream(theirs, i, t),
            "one-at-a-time": local_streams(llm, threading.Lock())}
        for side in sides.values():  # warm up: load the model, fill caches
            await measure(side, 1, 4)
        for _ in range(args.rounds):
            for n in args.streams:
                for name, side in sides.items():
                    got = await measure(side, n, args.tokens)
                    found.setdefault(f"{name} tok/s", {}).setdefault(n, []).append(got["tok_s"])
                    found.setdefault(f"{name} ttft ms", {}).setdefault(n, []).append(
                        got["ttft_ms"])
    return found


def report(found: dict[str, dict[int, list[float]]]) -> list[str]:
    def med(key: str, n: int) -> float:
        return statistics.median(found[key][n])

    lines = []
    for key, by_n in found.items():
        for n, values in by_n.items():
            lines.append(f"{key:<26} {n} stream(s): median {statistics.median(values):8.1f} "
                         f"(range {min(values):.1f}-{max(values):.1f}, {len(values)} runs)")
    single = med("swarm tok/s", 1) / med("llama-server tok/s", 1)
    lines.append(f"single stream, swarm / llama-server: {single:.2f} (target >= 0.9)")
    if 4 in found["swarm tok/s"]:
        four = med("swarm tok/s", 4) / med("llama-server tok/s", 4)
        own = med("swarm tok/s", 4) / med("swarm tok/s", 1)
        lines.append(f"4 streams, swarm / llama-server aggregate: {four:.2f} (target >= 0.8)")
        lines.append(f"4 streams, swarm aggregate / its single stream: {own:.2f} "
                     "(target >= 1.5)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.parallel")
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--n-ctx", type=int, default=1024, help="context per slot")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.streams = [int(x) for x in args.streams.split(",")]
    import llama_cpp

    model = default_models_dir() / f"{MODEL}.gguf"
    with tempfile.TemporaryDirectory(prefix="myco-bench-") as state:
        procs = start(args, model, Path(state))
        try:
            llm = llama_cpp.Llama(str(model), n_ctx=args.n_ctx, n_threads=args.threads,
                                  n_threads_batch=args.threads, verbose=False)
            found = asyncio.run(bench(args, llm))
        finally:
            stop(procs)
    print(f"{args.slots} slots, {args.threads} threads, {args.n_ctx} tokens of context per "
          f"slot, {args.tokens} tokens per stream, {args.rounds} rounds")
    if args.json:
        print(json.dumps(found))
    print("\n".join(report(found)))


if __name__ == "__main__":
    main()

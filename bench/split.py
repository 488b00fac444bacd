"""Split inference on loopback: all local vs one rpc worker vs two, the real default model.

`python -m bench.split [--tokens 32] [--rounds 3] [--threads N] [--json]` starts two rpc workers
(`python -m nodeagent.lending.rpcworker --port 0`) and, one after the other, three runners:

- local: every layer on this process's CPU (no --rpc);
- 1 worker: layers 0-1 on the head's CPU, the rest and the output layer on RPC0;
- 2 workers: layers 0-1 on the head's CPU, 2-7 on RPC0, the rest and the output on RPC1.

For each it prints the load time from the runner's load record and greedy tokens/s of a
`--tokens`-token completion (best of `--rounds`, prompt processing included), and whether the
two splits produced the same text (they should: same layers on the head's CPU).  Workers and
runners share this machine's cores, so this measures the per-token cost of the hops, not a
speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from nodeagent.store import default_models_dir

PROMPT = "The three primary colours are"


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", *args], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def wait_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 60) -> re.Match[str]:
    assert proc.stdout is not None
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline and (line := proc.stdout.readline()):
        seen.append(line)
        if found := re.search(pattern, line):
            return found
    raise SystemExit(f"no {pattern!r} from {proc.args!r}:\n{''.join(seen)}")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def measure(model: Path, sock: Path, flags: list[str], args: argparse.Namespace) -> dict[str, Any]:
    runner = spawn("nodeagent.runner", "--model", str(model), "--id", "m", "--socket", str(sock),
                   "--n-ctx", "512", "--threads", str(args.threads), *flags)
    try:
        record = json.loads(wait_line(runner, r"runner-load-record (\{.*\})")[1])
        if flags:
            wait_line(runner, "split verified")
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://r",
                          timeout=120) as http:
            while True:
                try:
                    http.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            best, text = 0.0, ""
            for _ in range(args.rounds):
                started = time.perf_counter()
                body = http.post("/v1/completions", json={
                    "model": "m", "prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0,
                }).json()
                rate = body["usage"]["completion_tokens"] / (time.perf_counter() - started)
                best, text = max(best, rate), body["choices"][0]["text"]
    finally:
        stop(runner)
    return {"load_s": record["load_seconds"], "tokens_per_s": round(best, 1), "text": text,
            "layers": {d["name"]: len(d["layers"]) for d in record["devices"]}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.split")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="llama.cpp threads of each runner and each worker")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = default_models_dir() / "gemma-3-270m-q4_k_m.gguf"
    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
        workers = [spawn("nodeagent.lending.rpcworker", "--port", "0", "--cache-dir", f"{tmp}/c{i}",
                         "--threads", str(args.threads)) for i in range(2)]
        try:
            ends = [wait_line(w, r"listening on (\S+)")[1] for w in workers]
            sock = Path(tmp) / "r.sock"
            runs = {
                "local": measure(model, sock, [], args),
                "1 worker": measure(model, sock, ["--rpc", ends[0], "--n-gpu-layers", "17",
                                                  "--tensor-split", "17"], args),
                "2 workers": measure(model, sock, ["--rpc", ends[0], "--rpc", ends[1],
                                                   "--n-gpu-layers", "17",
                                                   "--tensor-split", "6,11"], args),
            }
        finally:
            for worker in workers:
                stop(worker)
    same = runs["1 worker"]["text"] == runs["2 workers"]["text"]
    if args.json:
        print(json.dumps({"runs": runs, "splits_agree": same}))
        return
    for name, run in runs.items():
        print(f"{name:>9}: load {run['load_s']:.2f} s, {run['tokens_per_s']:6.1f} tok/s "
              f"({args.tokens} tokens, best of {args.rounds}), layers {run['layers']}")
    print(f"1-worker and 2-worker splits give the same text: {same}")


if __name__ == "__main__":
    main()

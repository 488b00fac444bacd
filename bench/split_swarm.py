"""Split inference across hosts: mycoSwarm against plain llama.cpp RPC, same build, same layer
shares, same hosts (network namespaces; needs root).

`python -m bench.split_swarm [--tokens 32] [--rounds 3]` builds a LAN of a gateway, a head
and two workers.  Memory limits make the gateway split the default model over both workers;
its plan's n_gpu_layers and tensor_split are then used by every side, round after round:

- plain: ggml's own RPC servers on the workers' LAN addresses (no authentication: how
  llama.cpp's rpc-server runs), and on the head one process that registers them and loads
  through llama-cpp-python, as anyone would without mycoSwarm;
- direct: our runner (nodeagent.runner) on the head with --rpc straight at those servers:
  mycoSwarm's head without the TLS channel;
- swarm: node agents on every host, the workers lending through their mutual-TLS tunnels,
  the request sent through the gateway (streamed).

Tokens/s is decode speed, (tokens - 1) / (last token - first token), on every side, so neither
prompt processing nor HTTP set-up is in it.  Load time is llama.cpp's model load (the runner's
load record; the constructor for plain); the swarm loads once, the others once per round.
Targets: swarm/plain >= 0.90 (with TLS), direct/plain >= 0.95 (without).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from myco.identity import load_or_create
from myco.protocol import COMPUTE_BYTES, ModelShape
from myco.tls import client_context
from nodeagent import pairing
from tests import netns
from tests.procs import Proc, myco

MODEL = "gemma-3-270m-q4_k_m"
PROMPT = "The three primary colours are"


def limits(shape: ModelShape) -> dict[str, int]:
    """Memory limits: the head holds no layer; `wa` holds everything else alone; `wb` can hold
    the output and two layers, `wc` every layer but not the output: only both together."""
    per = shape.layer_bytes + shape.kv_bytes_per_layer
    tail, margin = shape.output_bytes + shape.logits_bytes, per // 2
    return {"head": COMPUTE_BYTES + shape.input_bytes + margin,
            "wa": COMPUTE_BYTES + tail + shape.n_layers * per + margin,
            "wb": COMPUTE_BYTES + tail + 2 * per + margin,
            "wc": COMPUTE_BYTES + shape.n_layers * per + margin}


def decode_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def plain_worker(host: str, port: int, cache: str) -> None:
    """ggml's RPC server on a LAN address: the unauthenticated baseline, on purpose."""
    import ctypes

    from nodeagent.lending import rpc

    dev = rpc._fn("ggml_backend_dev_by_type", rpc._P, ctypes.c_int)(0)
    start = rpc._registry_fn("ggml_backend_rpc_start_server", None, ctypes.c_char_p,
                             ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                             ctypes.POINTER(rpc._P))
    Path(cache).mkdir(parents=True, exist_ok=True)
    print(f"plain worker listening on {host}:{port}", flush=True)
    start(f"{host}:{port}".encode(), cache.encode(), 2, 1, (rpc._P * 1)(dev))


def plain_head(model: str, endpoints: list[str], ngl: int, split: list[float],
               tokens: int) -> None:
    import llama_cpp

    from nodeagent.lending import rpc

    rpc.add_servers(endpoints)
    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_gpu_layers=ngl, tensor_split=split,
                          split_mode=llama_cpp.LLAMA_SPLIT_MODE_LAYER, verbose=False)
    load = time.perf_counter() - started
    stamps = [time.perf_counter() for _ in llm.create_completion(
        PROMPT, max_tokens=tokens, temperature=0, stream=True)]
    print(json.dumps({"load_s": load, "tok_s": decode_rate(stamps)}), flush=True)


def streamed(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    stamps = []
    with client.stream("POST", url, json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    return decode_rate(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.split_swarm")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--role", help=argparse.SUPPRESS)  # plain-worker / plain-head, inside
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "plain-worker":
        plain_worker(*json.loads(args.args))
        return
    if args.role == "plain-head":
        plain_head(*json.loads(args.args))
        return
    why = netns.available()
    if why:
        raise SystemExit(f"bench.split_swarm: {why}")
    from nodeagent.store import default_models_dir

    models = default_models_dir()
    with tempfile.TemporaryDirectory() as tmp, netns.Lan() as lan:
        r = run(lan, Path(tmp), models, args)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"split over 2 workers on other hosts: n_gpu_layers {r['n_gpu_layers']}, tensor_split "
          f"{r['tensor_split']}; {r['tokens']} tokens, greedy, {r['rounds']} rounds")
    for side in ("plain", "direct", "swarm"):
        rates = ", ".join(f"{x:.1f}" for x in r["decode_tok_s_all"][side])
        loads = ", ".join(f"{x:.2f}" for x in r["load_s_all"][side])
        print(f"{side:>6}: decode tok/s {rates} (best {r['decode_tok_s_best'][side]:.1f}); "
              f"load s {loads}")
    print(f"ratios of best decode rates: direct/plain {r['ratio_direct_plain']} (target >= 0.95), "
          f"swarm/plain {r['ratio_swarm_plain']} (target >= 0.90)")


def run(lan: netns.Lan, tmp: Path, models: Path, args: argparse.Namespace) -> dict[str, Any]:
    for host in ("gw", "head", "wb", "wc"):
        lan.host(host)
    me = [sys.executable, "-m", "bench.split_swarm"]
    gateway = load_or_create(tmp / "gateway", "bench gateway")
    ids = {}
    for name in ("head", "wb", "wc"):
        pairing.add(tmp / name, gateway.id, gateway.pem(), "bench")
        ids[name] = load_or_create(tmp / name, name).id
    tls_client = httpx.Client(verify=client_context(gateway), timeout=300)
    procs: list[Proc] = []

    def node(name: str, limit: int | None) -> Proc:
        extra = ["--memory-limit", str(limit)] if limit else []
        proc = myco("node", "--host", lan.hosts[name][1], "--port", "8788", "--name", name,
                    "--models", str(models if name == "head" else tmp / "none"), "--n-ctx",
                    "512", "--state-dir", str(tmp / name), *extra, prefix=lan.prefix(name))
        procs.append(proc)
        return proc

    try:
        head = node("head", None)
        shape = ModelShape(**tls_client.get(head.url + "/node/info").json()["shapes"][MODEL])
        head.stop()
        budget = limits(shape)
        head, *_ = (node(n, budget[n]) for n in ("head", "wb", "wc"))
        policy = tmp / "policy.toml"
        policy.write_text("".join(f'[nodes.{n}]\nid = "{i}"\n' for n, i in ids.items())
                          + '[[routes]]\nforward = ["head"]\nsplit = ["head", "wb", "wc"]\n')
        address = lan.hosts["gw"][1]
        gw = myco("gateway", "--policy", str(policy), "--host", address, "--discover", address,
                  "--audit-log", str(tmp / "audit.jsonl"), "--state-dir", str(tmp / "gateway"),
                  prefix=lan.prefix("gw"))
        procs.append(gw)
        client = httpx.Client(base_url=gw.url, timeout=300)
        plan: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while not plan.get("allowed") and time.monotonic() < deadline:
            plan = client.post("/v1/policy/dry-run", json={"model": MODEL}).json()
            time.sleep(0.2)
        if not plan.get("plan") or len(plan["plan"]["workers"]) != 2:
            raise SystemExit(f"the gateway did not plan a 2-worker split: {plan}")
        ngl, split = plan["plan"]["n_gpu_layers"], plan["plan"]["tensor_split"]
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0}
        for name in ("wb", "wc"):  # ggml's own servers, beside the node agents' workers
            procs.append(Proc([*lan.prefix(name), *me, "--role", "plain-worker", "--args",
                               json.dumps([lan.hosts[name][1], 50052, str(tmp / f"c-{name}")])],
                              ready=r"plain worker listening"))
        ends = [f"{lan.hosts[n][1]}:50052" for n in ("wb", "wc")]
        sides: dict[str, list[float]] = {"plain": [], "direct": [], "swarm": []}
        loads: dict[str, list[float]] = {"plain": [], "direct": [], "swarm": []}
        for _ in range(args.rounds):
            out = Proc([*lan.prefix("head"), *me, "--role", "plain-head", "--args",
                        json.dumps([str(models / f"{MODEL}.gguf"), ends, ngl, split,
                                    args.tokens])], timeout=300, ready=r"^\{")
            result = json.loads(out.ready_line)
            out.stop()
            sides["plain"].append(result["tok_s"])
            loads["plain"].append(result["load_s"])
            sock = tmp / "direct.sock"
            runner = Proc([*lan.prefix("head"), sys.executable, "-m", "nodeagent.runner",
                           "--model", str(models / f"{MODEL}.gguf"), "--id", MODEL,
                           "--socket", str(sock), "--n-ctx", "512", "--n-gpu-layers", str(ngl),
                           "--tensor-split", ",".join(map(str, split)),
                           *(x for e in ends for x in ("--rpc", e))],
                          timeout=300, ready=r"runner-load-record (\{.*\})")
            loads["direct"].append(json.loads(runner.ready_match[1])["load_seconds"])
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=300) as uds:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        uds.get("http://r/health")
                        break
                    except httpx.TransportError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                sides["direct"].append(streamed(uds, "http://r/v1/completions", body))
            runner.stop()
            sides["swarm"].append(streamed(client, "/v1/completions", body))
        info = tls_client.get(head.url + "/node/info").json()
        loads["swarm"].append(info["splits"][MODEL]["record"]["load_seconds"])
    finally:
        for proc in procs:
            proc.stop()
    best = {k: max(v) for k, v in sides.items()}
    return {"tokens": args.tokens, "rounds": args.rounds, "n_gpu_layers": ngl,
            "tensor_split": split, "decode_tok_s_best": best,
            "decode_tok_s_all": sides,
            "load_s_all": loads,
            "ratio_direct_plain": round(best["direct"] / best["plain"], 3),
            "ratio_swarm_plain": round(best["swarm"] / best["plain"], 3),
            "targets": {"ratio_direct_plain": ">= 0.95", "ratio_swarm_plain": ">= 0.90"}}


if __name__ == "__main__":
    main()

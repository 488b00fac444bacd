"""The `myco` command: run a gateway or a node, inspect the swarm, check and explain policies."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec

from myco import lifeline
from myco.errors import ConfigError

DEFAULT_GATEWAY = "http://127.0.0.1:8787"


def _log_setup() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise


def cmd_gateway(args: argparse.Namespace) -> None:
    from gateway import policy
    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from myco.identity import load_or_create
    from myco.serve import bind, serve

    settings = GatewaySettings.from_env(policy_path=args.policy, host=args.host, port=args.port,
                                        audit_path=args.audit_log, discover=args.discover,
                                        state_dir=args.state_dir)
    identity = load_or_create(Path(settings.state_dir), "myco gateway")
    if args.action == "id":
        print(identity.id)
        return
    _log_setup()
    app = create_app(settings, policy.load(settings.policy_path), identity)
    logging.getLogger("myco.gateway").info(
        "gateway id %s (pair a node with it: `myco node allow %s`)", identity.id, identity.id)
    serve(app, bind(settings.host, settings.port), "myco gateway", limits=settings)


def cmd_node(args: argparse.Namespace) -> None:
    from myco.identity import load_or_create
    from myco.serve import serve
    from nodeagent.app import build
    from nodeagent.settings import NodeSettings

    settings = NodeSettings.from_env(
        host=args.host, port=args.port, models_dir=args.models, name=args.name, n_ctx=args.n_ctx,
        queue_size=args.queue_size, state_dir=args.state_dir, parallel=args.parallel,
        threads=args.threads, announce=args.announce, memory_limit=args.memory_limit)
    identity = load_or_create(Path(settings.state_dir), settings.name)
    if args.action == "id":
        print(identity.id)
    elif args.action == "allow":
        _node_allow(args, Path(settings.state_dir))
    else:
        _log_setup()
        app, sock, tls = build(settings, identity)
        serve(app, sock, "myco node", tls=tls, limits=settings)


def _node_allow(args: argparse.Namespace, state_dir: Path) -> None:
    """Pair a gateway: its certificate, from a file or fetched, must have the id typed."""
    from myco.tls import certificate_id
    from nodeagent import pairing

    if args.cert:  # a file the person chose: its certificate is the one to trust
        try:
            pem, name = Path(args.cert).read_text(encoding="ascii"), args.cert
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(args.cert, f"cannot read the certificate: {exc}") from None
    elif args.peer:  # fetched over the network: it must be the id the person typed
        found = _gateway_call(args, "GET", "/v1/identity")
        pem, name = str(found.get("certificate") if isinstance(found, dict) else ""), args.gateway
    else:
        raise SystemExit("myco: which gateway? `myco node allow GATEWAY_ID` "
                         "(`myco gateway id` prints it), or --cert FILE")
    try:
        gateway_id = args.peer or certificate_id(pem)
        added = pairing.add(state_dir, gateway_id, pem, name)
    except ValueError as exc:  # PairingError too
        raise SystemExit(f"myco: not paired: {exc}") from None
    print(f"{'paired' if added else 'already paired:'} gateway {gateway_id} "
          f"({state_dir / pairing.FILE}); a running node serves it within a second")


def _gateway_call(args: argparse.Namespace, method: str, path: str,
                  body: dict[str, Any] | None = None) -> Any:
    key = os.environ.get("MYCO_API_KEY")
    try:
        response = httpx.request(method, args.gateway.rstrip("/") + path, json=body, timeout=10,
                                 headers={"authorization": f"Bearer {key}"} if key else {})
    except httpx.HTTPError as exc:
        raise SystemExit(f"myco: cannot reach the gateway at {args.gateway}: {exc}") from None
    if response.status_code != 200:
        raise SystemExit(f"myco: gateway answered {response.status_code}: {response.text}")
    return response.json()


def cmd_nodes(args: argparse.Namespace) -> None:
    swarm = _gateway_call(args, "GET", "/v1/swarm")
    if args.json:
        print(json.dumps(swarm, indent=2))
        return
    if not swarm["nodes"]:
        print("the policy lists no nodes")
    for n in swarm["nodes"]:
        state = "healthy" if n["healthy"] else f"UNHEALTHY ({n['reason']})"
        print(f"{n['name']:<16} {n['address'] or '(by id)':<22} {state}  role={n['role']} "
              f"slots={n['slots']} threads={n['threads']}")
        print(f"    id {n['id'] or 'not pinned (loopback)'}")
        for model in n["models"]:
            loaded = " (loaded)" if model in n["loaded"] else ""
            print(f"    {model}{loaded} running or queued={n['queue'].get(model, 0)}")
        for model, split in n.get("splits", {}).items():
            spans = [f"{d['name']} {_span(d['layers'])}" for d in split["record"]["devices"]]
            hosts = ", ".join(f"{w['node']} ({w['host']})" for w in split["workers"])
            print(f"    {model} split over {hosts}: " + "; ".join(spans))
        for lease in n.get("lent", []):
            print(f"    lends {lease['device']} to {lease['head'][:7]} for {lease['model']} "
                  f"({lease['connections']} connection(s))")
    for d in [d for d in swarm.get("discovered", []) if d["status"] != "listed"]:
        where = ", ".join(f"{a}:{d['port']}" for a in d["addresses"])
        print(f"discovered {d['name']} at {where}: {d['status']}\n    id {d['id']}")


def _span(layers: list[int]) -> str:
    return f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"


def cmd_policy_check(args: argparse.Namespace) -> None:
    from gateway.policy import load

    p = load(args.file)
    print(f"{args.file}: ok ({len(p.nodes)} node(s), {len(p.upstreams)} upstream(s), "
          f"{len(p.routes)} route(s))")
    for route in p.routes:
        print(f"  {route.name}: {route.text}")


def cmd_policy_explain(args: argparse.Namespace) -> None:
    body = {"model": args.model, "endpoint": args.endpoint}
    if args.tools:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    if args.policy:
        from gateway.policy import load
        from gateway.resolve import NodeView, RoutingRequest, resolve

        p = load(args.policy)
        print("offline: every listed node is assumed healthy and to serve the model")
        decision = resolve(RoutingRequest(args.endpoint, args.model, args.client, args.tools),
                           p, {name: NodeView(name, True, None) for name in p.nodes})
        result = {"rule_name": decision.rule_name, **msgspec.to_builtins(decision)}
    else:
        result = _gateway_call(args, "POST", "/v1/policy/dry-run", body)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    verdict = "ALLOWED" if result["allowed"] else f"REFUSED ({result['status']})"
    print(f"{verdict}: {result['message']}")
    print(f"rule: {result['rule_name']}" + (f"  {result['rule']}" if result.get("rule") else ""))
    for c in result["candidates"]:
        mark = "->" if c["chosen"] else ("ok" if c["eligible"] else "no")
        print(f"  {mark} {c['target']} ({c['kind']}): {c['reason']}")
    for d in (result.get("plan") or {"devices": ()})["devices"]:
        units = list(range(d["first"], d["first"] + d["count"]))
        print(f"  {d['role']} {d['node']} {d['device']}: {_span(units)}"
              f"{' + output' if d['holds_output'] else ''}, needs "
              f"{d['need_bytes'] / 2**20:.0f} of {d['free_bytes'] / 2**20:.0f} MiB")


def cmd_policy_allow(args: argparse.Namespace) -> None:
    """Append a discovered node to the policy file, leaving what was there as it was."""
    import tomlkit

    from gateway.policy import PolicyError, load, parse

    found = [d for d in _gateway_call(args, "GET", "/v1/swarm")["discovered"]
             if args.node in (d["name"], d["id"])]
    if listed := [d for d in found if d["status"] == "listed"]:
        print(f"{listed[0]['name']} ({listed[0]['id']}) is already in the policy")
        return
    # A host whose name or id is pinned to another certificate is never a candidate.
    found = [d for d in found if not d["status"].startswith("identity mismatch")]
    if len(found) != 1:
        raise SystemExit(f"myco: {len(found)} discovered nodes match {args.node!r}; "
                         "name one by its id (see `myco nodes`)")
    node, path, name = found[0], Path(args.policy), args.name or found[0]["name"]
    if name in load(path).nodes:
        raise ConfigError(str(path), f"not added: it lists {name!r} already; pass --name")
    entry = tomlkit.table()  # tomlkit writes the name as TOML needs it: [nodes."pi.lan"]
    entry.update(address=f"{node['addresses'][0]}:{node['port']}", id=node["id"])
    entry.comment("added by `myco policy allow`")
    text = path.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + tomlkit.dumps(
        {"nodes": {name: entry}})
    try:
        parse(text, str(path))  # as the gateway will read it
    except PolicyError as exc:
        raise ConfigError(str(path), f"not added: {exc.reason}") from None
    path.write_text(text, encoding="utf-8")
    print(f"added node {name!r} ({node['id']}) to {path}; a route must name it before any "
          "request goes there; restart the gateway to load the policy")


def cmd_hw(args: argparse.Namespace) -> None:
    from nodeagent import capability, hardware
    from nodeagent.settings import NodeSettings
    from nodeagent.store import ModelStore

    settings = NodeSettings.from_env(models_dir=args.models, n_ctx=args.n_ctx)
    hw = hardware.detect()
    threads = settings.threads or hardware.default_threads()
    slots = settings.parallel or hardware.default_slots(hw)
    models = ModelStore(Path(settings.models_dir)).list()
    caps = capability.classify(hw, models, settings.n_ctx * slots,  # KV for every slot
                               memory_limit=settings.memory_limit)
    if args.json:
        print(json.dumps({"hardware": msgspec.to_builtins(hw), "threads": threads,
                          "slots": slots, "capabilities": msgspec.to_builtins(caps)}, indent=2))
        return
    gib = 1024**3
    print(f"{hw.hostname}: {hw.cpu_model} ({hw.cpu_cores} threads, {hw.machine})")
    print(f"RAM: {hw.ram_available / gib:.1f} of {hw.ram_total / gib:.1f} GiB available")
    for gpu in hw.gpus:
        print(f"GPU {gpu.index}: {gpu.name}, {gpu.memory_free / gib:.1f} of "
              f"{gpu.memory_total / gib:.1f} GiB free, driver {gpu.driver}")
    if not hw.gpus:
        print("GPU: none found (CPU inference)")
    print(f"role: {caps.role}; llama.cpp: {threads} threads, {slots} slots per model")
    print(f"models in {settings.models_dir} (context {settings.n_ctx} per slot):")
    for fit in caps.models:
        print(f"  {fit.model}: {fit.fit} - {fit.reason}")


def cmd_up(args: argparse.Namespace) -> None:
    from mycoswarm.up import up

    up(args)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="myco", description="mycoSwarm: a local-first "
                                   "OpenAI-compatible gateway in front of your own machines.")
    sub = root.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local node and a gateway (Ctrl-C stops both)")
    up.add_argument("--policy", default="policies/default.toml")
    up.add_argument("--port", type=int, default=8787)
    up.add_argument("--node-port", type=int, default=8788)
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="run the OpenAI-compatible gateway "
                        "(`myco gateway id`: its id)")
    gw.add_argument("action", nargs="?", choices=["id"], help="print the gateway's id and exit")
    gw.add_argument("--state-dir", help="identity (default: the user state dir)")
    gw.add_argument("--policy", help="policy file (default: $MYCO_POLICY or policies/default.toml)")
    gw.add_argument("--host", help="listen address (default 127.0.0.1)")
    gw.add_argument("--port", type=int, help="listen port (default 8787; 0 picks a free one)")
    gw.add_argument("--audit-log", help="JSONL audit log path")
    gw.add_argument("--discover", metavar="ADDRESS", help="browse mDNS for nodes on the "
                    "interface with this IPv4 address (discovery shows; the policy decides)")
    gw.set_defaults(func=cmd_gateway)

    nd = sub.add_parser("node", help="run this machine's node agent (`myco node id`: its id; "
                        "`myco node allow GATEWAY_ID`: serve that gateway)")
    nd.add_argument("action", nargs="?", choices=["id", "allow"],
                    help="id: print this node's id; allow: pair a gateway with this node")
    nd.add_argument("peer", nargs="?", help="allow: the gateway's id")
    nd.add_argument("--cert", help="allow: the gateway's certificate file (else it is fetched "
                    "from --gateway and must have the id given)")
    nd.add_argument("--gateway", default=os.environ.get("MYCO_GATEWAY_URL", DEFAULT_GATEWAY),
                    help="allow: the gateway to fetch the certificate from")
    nd.add_argument("--state-dir", help="identity and state (default: the user state dir)")
    nd.add_argument("--announce", metavar="ADDRESS", help="announce this node by mDNS on "
                    "the interface with this IPv4 address (default: the --host address, "
                    "unless it is loopback)")
    nd.add_argument("--host", help="listen address (default 127.0.0.1)")
    nd.add_argument("--port", type=int, help="listen port (default 8788; 0 picks a free one)")
    nd.add_argument("--models", help="model directory (default: $MYCO_MODELS or the data dir)")
    nd.add_argument("--name", help="node name (default: the host name)")
    nd.add_argument("--n-ctx", type=int, help="context length per model (default 4096)")
    nd.add_argument("--parallel", type=int, help="slots: requests a model decodes at once "
                    "(default 4; 2 under 8 GiB of RAM)")
    nd.add_argument("--threads", type=int, help="llama.cpp threads (default: physical cores)")
    nd.add_argument("--queue-size", type=int, help="requests per model waiting for a slot "
                    "before 429 (default 8)")
    nd.add_argument("--memory-limit", help="memory this node uses for models and lends: bytes, "
                    "or 300M, 2G (default: what is free)")
    nd.set_defaults(func=cmd_node)

    nodes = sub.add_parser("nodes", help="show the nodes the gateway sees")
    nodes.add_argument("--gateway", default=os.environ.get("MYCO_GATEWAY_URL", DEFAULT_GATEWAY))
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(func=cmd_nodes)

    pol = sub.add_parser("policy", help="check or explain a policy")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    check = psub.add_parser("check", help="validate a policy file")
    check.add_argument("file")
    check.set_defaults(func=cmd_policy_check)
    explain = psub.add_parser("explain", help="where would a request go, and why (dry-run)")
    explain.add_argument("--model", required=True)
    explain.add_argument("--endpoint", default="chat", choices=[
        "chat", "completions", "embeddings", "responses", "messages"])
    explain.add_argument("--tools", action="store_true", help="the request carries tools")
    explain.add_argument("--client", help="client name (offline mode only)")
    explain.add_argument("--policy", help="resolve offline against this file instead of "
                         "asking the running gateway")
    explain.add_argument("--gateway", default=os.environ.get("MYCO_GATEWAY_URL", DEFAULT_GATEWAY))
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(func=cmd_policy_explain)

    allow = psub.add_parser("allow", help="add a discovered node (by name or id) to a policy")
    allow.add_argument("node")
    allow.add_argument("--policy", default=os.environ.get("MYCO_POLICY", "policies/default.toml"))
    allow.add_argument("--name", help="the name to list it under (default: its own)")
    allow.add_argument("--gateway", default=os.environ.get("MYCO_GATEWAY_URL", DEFAULT_GATEWAY))
    allow.set_defaults(func=cmd_policy_allow)

    hw = sub.add_parser("hw", help="hardware and capability report for this machine")
    hw.add_argument("--models", help="model directory")
    hw.add_argument("--n-ctx", type=int)
    hw.add_argument("--json", action="store_true")
    hw.set_defaults(func=cmd_hw)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if os.environ.get(lifeline.PARENT):  # started by `myco up`: stop when it ends
        lifeline.die_with_parent(signal.SIGTERM)
    try:
        args.func(args)
    except ConfigError as exc:  # a setting, the policy or a file stops start-up: one line
        print(f"myco: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""A rogue host for the multi-host tests: announces itself as a mycoSwarm node with whatever
name and id it likes, serves mutual TLS with its own certificate (even trusting the gateway, the
worst case), and prints one `rogue: request ...` line per HTTP request it ever receives.

    python -m tests.rogue --host ADDR --name NAME --claim-id ID --state DIR --trust CERT
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.fake_upstream import make_app
from myco.identity import load_or_create
from myco.serve import bind, serve
from myco.tls import server_context
from nodeagent.announce import Announcer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--claim-id", required=True, help="the id it announces (maybe not its)")
    parser.add_argument("--state", required=True)
    parser.add_argument("--trust", required=True)
    parser.add_argument("--model", default="gemma-3-270m-q4_k_m")
    args = parser.parse_args()
    identity = load_or_create(Path(args.state), args.name)
    inner = make_app(args.name, (args.model,))
    announcer = Announcer(args.host, args.name, 8788, {"id": args.claim_id},
                          host_name=f"rogue-{args.host.replace('.', '-')}.local.")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await announcer.start()
            await inner(scope, receive, send)
            await announcer.stop()
            return
        print(f"rogue: request {scope['method']} {scope['path']}", flush=True)
        await inner(scope, receive, send)

    serve(app, bind(args.host, 8788), f"rogue {args.name}",
          tls=server_context(identity, [Path(args.trust).read_text()]))


if __name__ == "__main__":
    main()

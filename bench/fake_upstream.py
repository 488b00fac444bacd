"""A fast fake OpenAI-compatible server, raw ASGI, answering instantly.

Used by the gateway benchmark (as the baseline upstream) and by tests as a stand-in node or
upstream where the real model would only slow things down.  It also answers `/node/info` like a
node agent, naming the models given to it, and can answer with a redirect to probe the gateway's
egress guard.  `python -m bench.fake_upstream --port P --name N` serves it alone; with
`--tls-state DIR --trust CERT` it serves mutual TLS as a node does (identity in DIR, serving
only the gateway whose certificate is CERT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def make_app(name: str, models: tuple[str, ...] = ("fake-model",), chunks: int = 16,
             redirect_to: str | None = None) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    info = json.dumps({
        "name": name, "models": [{"id": m} for m in models],
        "capabilities": {"role": "small-chat",
                         "models": [{"model": m, "fit": "ram"} for m in models]},
        "loaded": [], "queue": {}}).encode()
    listing = json.dumps({"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": name} for m in models]}).encode()
    headers = [(b"content-type", b"application/json"), (b"x-upstream", name.encode())]
    sse_headers = [(b"content-type", b"text/event-stream"), (b"x-upstream", name.encode())]

    def completion(model: str) -> bytes:
        return json.dumps({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"hello from {name}"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}).encode()

    def chunk(model: str, i: int) -> bytes:
        return b"data: " + json.dumps({
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
            "model": model, "choices": [{"index": 0, "delta": {"content": f"{i} "},
                                         "finish_reason": None}]}).encode() + b"\n\n"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if redirect_to is not None:
            await send({"type": "http.response.start", "status": 302,
                        "headers": [(b"location", redirect_to.encode()), *headers]})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/node/info":
            payload, status = info, 200
        elif path == "/v1/models":
            payload, status = listing, 200
        elif scope["method"] == "POST" and path.startswith("/v1/"):
            request = json.loads(body or b"{}")
            model = str(request.get("model", ""))
            if request.get("fake_delay"):  # tests: an answer that takes this many seconds
                await asyncio.sleep(float(request["fake_delay"]))
            if name in request.get("fake_busy", ()):  # tests: a node with every place taken
                payload = b'{"error":{"message":"busy","type":"rate_limit_error"}}'
                await send({"type": "http.response.start", "status": 429, "headers": [
                    *headers, (b"retry-after", b"30"),
                    (b"content-length", str(len(payload)).encode())]})
                await send({"type": "http.response.body", "body": payload})
                return
            if request.get("stream"):
                await send({"type": "http.response.start", "status": 200,
                            "headers": sse_headers})
                for i in range(chunks):
                    await send({"type": "http.response.body", "body": chunk(model, i),
                                "more_body": True})
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
                return
            payload, status = completion(model), 200
        else:
            payload, status = b'{"error":{"message":"not found","type":"x"}}', 404
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--model", action="append")
    parser.add_argument("--tls-state", help="serve mutual TLS as a node, identity kept here")
    parser.add_argument("--trust", help="with --tls-state: the gateway certificate to serve")
    args = parser.parse_args()
    from myco.serve import bind, serve

    tls = None
    if args.tls_state:
        from myco.identity import load_or_create
        from myco.tls import server_context

        trusted = [Path(args.trust).read_text()] if args.trust else []
        tls = server_context(load_or_create(Path(args.tls_state), args.name), trusted)
    serve(make_app(args.name, tuple(args.model or ["fake-model"])), bind(args.host, args.port),
          f"fake upstream {args.name}", tls=tls)


if __name__ == "__main__":
    main()

"""A model runner: the child process that owns one loaded llama.cpp model.

`python -m nodeagent.runner --model PATH --socket PATH` loads the model (printing progress),
then serves OpenAI-shaped chat, completion and embedding requests on a Unix socket that only
the node agent uses, a chat prompt's token count (/v1/chat/tokens), and the load record
(which device holds which layers) at GET /load.
Because the model lives here, a crash or an unload frees its memory and the node agent
survives; it dies with the node agent (nodeagent/child.py).  `--parallel N` requests generate
at once in one batch (nodeagent/runner/engine.py: slots, continuous batching, a prompt cache per
slot); every call into the context runs on the engine's thread.  Server-sent events are
produced with sse-starlette, the runner being a plain Starlette app.  A request is checked
whole before it waits for a slot (generate.py `prepare`: a 400, never a crash), and leaves its
slot at the next step once its client (the node agent's relay) closes the connection,
streamed or not; one whose client left while it waited never starts.

Split inference: `--rpc HOST:PORT` (repeatable, in device order RPC0, RPC1, ...) with
`--tensor-split` (one share per offloaded device, RPC devices first) and `--n-gpu-layers`
(see myco/layers.py for how llama.cpp maps them to layers).  The runner probes every worker
(exit 1 if one does not answer or speaks another protocol version), registers them, loads
with split mode LAYER, then checks llama.cpp's own load log against the split and exits 1 if
any device holds other layers than planned: never a silent local fallback.  One progress line
per step goes to stderr, then the record as one line `runner-load-record {json}`.  A worker
that dies later aborts this process (SIGABRT: returncode -6); the node agent's pool starts a new
runner on the next request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import os
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from myco import layers, protocol
from myco.errors import MycoError
from nodeagent import child, hardware
from nodeagent.gguf import GGUFError, read_header
from nodeagent.lending import rpc
from nodeagent.runner import engine, generate, loadrecord, wire
from nodeagent.store import meta_from_gguf


class Model:
    """One GGUF model: the engine's slots for generation, an embedding context made on first use."""

    def __init__(self, path: str, *, n_ctx: int, threads: int, slots: int,
                 n_gpu_layers: int = -1, tensor_split: tuple[float, ...] = ()) -> None:
        self.path, self.n_ctx, self.threads, self.slots = path, n_ctx, threads, slots
        self.n_gpu_layers, self.tensor_split = n_gpu_layers, tensor_split
        self.llm: Any = None
        self.engine: engine.Engine | None = None
        self._embedder: Any = None

    def load(self) -> None:
        import llama_cpp
        from llama_cpp import _internals

        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 2**31 - 1 if self.n_gpu_layers == -1 else self.n_gpu_layers
        params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_LAYER
        if self.tensor_split:
            self._split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*self.tensor_split)
            params.tensor_split = self._split
        self.llm = _internals.LlamaModel(path_model=self.path, params=params, verbose=False)
        self.engine = engine.Engine(self.llm, slots=self.slots, n_ctx=self.n_ctx,
                                    threads=self.threads)

    async def generate(self, prep: generate.Prepared) -> generate.Events:
        """The engine's events for one request; it leaves its slot when this is closed."""
        assert self.engine is not None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[engine.Event] = asyncio.Queue()
        job = engine.Job(prep.prompt, prep.max_tokens, prep.stop, prep.sampler,
                         lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        self.engine.submit(job)
        try:
            while not isinstance(event := await events.get(), engine.Finish):
                if isinstance(event, BaseException):
                    raise event
                yield event
            yield event
        finally:
            job.cancel.set()

    def embed(self, texts: list[str]) -> Any:
        if self._embedder is None:
            import llama_cpp

            # The same split (and the same workers) as the generation context.
            self._embedder = llama_cpp.Llama(
                model_path=self.path, n_ctx=self.n_ctx, n_gpu_layers=self.n_gpu_layers,
                split_mode=llama_cpp.LLAMA_SPLIT_MODE_LAYER, embedding=True,
                tensor_split=list(self.tensor_split) or None, n_threads=self.threads,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
        return self._embedder.create_embedding(texts)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error(exc: MycoError) -> Response:
    return Response(exc.envelope(), status_code=exc.status, media_type="application/json",
                    headers=exc.headers())


def create_app(model: Model, model_id: str,
               record: loadrecord.LoadRecord | None = None) -> Starlette:
    encode = msgspec.json.encode

    async def answer(result: Any, stream: bool) -> Response:
        if not stream:
            return Response(encode(_with_id(result, model_id)), media_type="application/json")

        async def events() -> AsyncIterator[bytes | str]:
            try:
                async for chunk in result:
                    yield encode(_with_id(chunk, model_id)).decode()
            except Exception as exc:  # the stream has started: report in-band
                yield encode({"error": {"message": f"generation failed: {exc}",
                                        "type": "api_error", "param": None,
                                        "code": "runner_failed"}}).decode()
            yield "[DONE]"

        return EventSourceResponse(events(), sep="\n", ping=15)

    async def generation(request: Request) -> Response:
        kind: type[wire.ChatRequest | wire.CompletionRequest] = wire.CompletionRequest
        if request.url.path != "/v1/completions":  # chat, or its prompt counted
            kind = wire.ChatRequest
        try:
            body = wire.decode(await request.body(), kind, n_ctx=model.n_ctx)
            prep = await asyncio.to_thread(generate.prepare, model.llm, model.n_ctx, body)
        except MycoError as exc:
            return _error(exc)
        if request.url.path == "/v1" + protocol.TOKENS_PATH:
            return Response(encode(protocol.TokenCount(len(prep.prompt))),
                            media_type="application/json")
        events, plain = model.generate(prep), wire.CompletionRequest
        if body.stream:
            return await answer(generate.complete_stream(events, body) if isinstance(body, plain)
                                else generate.chat_stream(events, prep, body), True)
        # Not streamed: a client (the node agent's relay) that leaves frees the slot at once.
        work = asyncio.ensure_future(generate.complete(events, body) if isinstance(body, plain)
                                     else generate.chat_once(events, prep, body))
        gone = asyncio.ensure_future(_until_disconnect(request))
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():
            work.cancel()
            return Response(status_code=499)
        return await answer(work.result(), False)

    async def embeddings(request: Request) -> Response:
        try:
            body = wire.decode(await request.body(), wire.EmbeddingRequest)
        except MycoError as exc:
            return _error(exc)
        texts = [body.input] if isinstance(body.input, str) else body.input
        assert model.engine is not None
        result = await asyncio.wrap_future(model.engine.call(lambda: model.embed(texts)))
        if body.encoding_format == "base64":  # what the openai client asks for by default
            for item in result["data"]:
                vector = item["embedding"]
                item["embedding"] = base64.b64encode(
                    struct.pack(f"<{len(vector)}f", *vector)).decode()
        return await answer(result, False)

    async def health(_: Request) -> Response:
        busy = model.engine.busy if model.engine else 0
        return Response(encode({"status": "ok", "slots": model.slots, "busy": busy}),
                        media_type="application/json")

    async def load(_: Request) -> Response:
        return Response(encode(record), media_type="application/json")

    return Starlette(routes=[
        Route("/v1/chat/completions", generation, methods=["POST"]),
        Route("/v1/completions", generation, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1" + protocol.TOKENS_PATH, generation, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/load", load, methods=["GET"]),
    ])


def _with_id(result: dict[str, Any], model_id: str) -> dict[str, Any]:
    """llama-cpp-python names the model by its path; clients expect the id they asked for."""
    result["model"] = model_id
    return result


def _connect_workers(args: argparse.Namespace, say: Callable[[str], None]) -> None:
    """Check the split, probe then register every worker; RpcError naming what is wrong."""
    meta = meta_from_gguf("", Path(args.model), read_header(args.model), 0)
    devices = max(len(args.rpc), len(args.tensor_split))
    shares = layers.layer_shares(meta.n_layers, args.n_gpu_layers, args.tensor_split, devices)
    idle = [e for e, n in zip(args.rpc, shares[1:], strict=False) if not n]
    if idle:
        raise rpc.RpcError(f"the split gives no layers to rpc worker(s) {', '.join(idle)}")
    ours = rpc.protocol_version()
    if ours is None:
        raise rpc.RpcError("--rpc needs a llama-cpp-python built with -DGGML_RPC=on")
    for endpoint in args.rpc:
        host, _, port = endpoint.rpartition(":")
        theirs = rpc.probe(host, int(port), args.probe_timeout)
        if theirs != ours:
            raise rpc.RpcError(f"rpc worker {endpoint} speaks protocol "
                               f"{rpc.version_text(theirs)}, this runner "
                               f"{rpc.version_text(ours)}; use the same llama.cpp build")
        say(f"rpc worker {endpoint} answers (protocol {rpc.version_text(theirs)})")
    names = rpc.add_servers(args.rpc)
    say("registered " + ", ".join(f"{n} = {e}" for n, e in zip(names, args.rpc, strict=False)))


def main(argv: list[str] | None = None) -> None:
    child.die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m nodeagent.runner")
    parser.add_argument("--model", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=hardware.default_threads())
    parser.add_argument("--parallel", type=int, default=4, help="slots: requests decoded at once")
    parser.add_argument("--rpc", action="append", default=[],
                        metavar="HOST:PORT", help="an rpc worker; repeat, in device order")
    parser.add_argument("--tensor-split", default=(),
                        type=lambda text: tuple(float(x) for x in text.split(",")),
                        help="one share per offloaded device: RPC devices, then local GPUs")
    parser.add_argument("--n-gpu-layers", type=int, default=-1,
                        help="units offloaded, counted from the output layer; -1: all")
    parser.add_argument("--probe-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.rpc and not args.tensor_split:
        parser.error("--rpc needs --tensor-split: the planned layers per device")

    import uvicorn

    def say(text: str) -> None:
        print(f"runner[{args.id}]: {text}", file=sys.stderr, flush=True)

    if args.rpc:
        # A worker that dies aborts this process; ggml would attach gdb for a backtrace of
        # that (a second, 80 lines in the node log): the abort message says enough.
        os.environ.setdefault("GGML_NO_BACKTRACE", "1")
        try:
            _connect_workers(args, say)
        except (rpc.RpcError, GGUFError, OSError) as exc:
            sys.exit(f"runner[{args.id}]: {exc}")
    log = loadrecord.LogCapture()
    log.install()
    model = Model(args.model, n_ctx=args.n_ctx, threads=args.threads, slots=args.parallel,
                  n_gpu_layers=args.n_gpu_layers, tensor_split=args.tensor_split)
    say(f"loading {args.model} (n_gpu_layers {args.n_gpu_layers}, tensor_split "
        f"{list(args.tensor_split)}) ...")
    started = time.perf_counter()
    model.load()
    seconds = time.perf_counter() - started
    log.recording = False
    say(f"loaded in {seconds:.1f} s: {args.parallel} slots of {args.n_ctx} tokens, "
        f"{args.threads} threads")
    record = loadrecord.parse(log.text, n_gpu_layers=args.n_gpu_layers,
                              tensor_split=args.tensor_split, load_seconds=round(seconds, 3))
    say("placed: " + "; ".join(f"{d.name} {loadrecord.span(d.layers, record.n_layers)}"
                               for d in record.devices))
    print(f"runner-load-record {msgspec.json.encode(record).decode()}", file=sys.stderr,
          flush=True)
    if args.rpc:
        problems = loadrecord.check(record, args.rpc)
        if problems:
            sys.exit(f"runner[{args.id}]: the load differs from the split asked for: "
                     + "; ".join(problems))
        say("split verified: every device holds the layers planned")
    uvicorn.run(create_app(model, args.id, record), uds=args.socket, log_level="warning",
                access_log=False, timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()

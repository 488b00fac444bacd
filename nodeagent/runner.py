"""A model runner: the child process that owns one loaded llama.cpp model.

`python -m nodeagent.runner --model PATH --socket PATH` loads the model (printing progress),
then serves OpenAI-shaped chat, completion and embedding requests on a Unix socket that only
the node agent uses.  Because the model lives here, a crash or an unload frees its memory and
the node agent survives.  llama.cpp is not thread-safe: every call into it runs on the one
worker thread of `Model`, off the event loop.  Server-sent events are produced with
sse-starlette, the runner being a plain Starlette app.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from myco.errors import MycoError
from nodeagent import generate, wire

_DONE = object()


class Model:
    """One GGUF model: a generation context, and an embedding context made on first use."""

    def __init__(self, path: str, *, n_ctx: int, threads: int | None) -> None:
        self.path, self.n_ctx, self.threads = path, n_ctx, threads
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._llm: Any = None
        self._embedder: Any = None

    def _open(self, **extra: Any) -> Any:
        from llama_cpp import Llama  # the node's extra; never imported by the gateway

        return Llama(model_path=self.path, n_ctx=self.n_ctx, n_gpu_layers=-1,
                     n_threads=self.threads, verbose=False,
                     **extra)

    def load(self) -> None:
        self._llm = self._open()

    def chat(self, body: wire.ChatRequest, model_id: str) -> Any:
        prep = generate.prepare(self._llm, body)
        return generate.chat_once(self._llm, prep, body, model_id)

    def chat_stream(self, body: wire.ChatRequest, model_id: str) -> Iterator[Any]:
        prep = generate.prepare(self._llm, body)
        yield from generate.chat_stream(self._llm, prep, body, model_id)

    def complete(self, **kwargs: Any) -> Any:
        return self._llm.create_completion(**kwargs)

    def embed(self, texts: list[str]) -> Any:
        if self._embedder is None:
            import llama_cpp

            self._embedder = self._open(embedding=True,
                                        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        return self._embedder.create_embedding(texts)

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.worker, lambda: fn(*args, **kwargs))

    async def stream(self, fn: Callable[..., Iterator[Any]], **kwargs: Any) -> AsyncIterator[Any]:
        """Iterate a llama-cpp-python generator on the worker thread; stop it if we go away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            try:
                for item in fn(**kwargs):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                    if stop.is_set():
                        break
            except Exception as exc:  # handed to the consumer, which reports it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        done = loop.run_in_executor(self.worker, produce)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()
            await asyncio.shield(done)


def _sampling(body: wire.ChatRequest | wire.CompletionRequest) -> dict[str, Any]:
    args: dict[str, Any] = {"stream": body.stream, "stop": body.stop, "seed": body.seed}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None:
            args[name] = value
    return args


def _error(exc: MycoError) -> Response:
    return Response(exc.envelope(), status_code=exc.status, media_type="application/json",
                    headers=exc.headers())


def create_app(model: Model, model_id: str) -> Starlette:
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

    async def chat(request: Request) -> Response:
        try:
            body = wire.decode(await request.body(), wire.ChatRequest)
        except MycoError as exc:
            return _error(exc)
        if body.stream:
            return await answer(model.stream(model.chat_stream, body=body, model_id=model_id),
                                True)
        return await answer(await model.run(model.chat, body, model_id), False)

    async def completions(request: Request) -> Response:
        try:
            body = wire.decode(await request.body(), wire.CompletionRequest)
        except MycoError as exc:
            return _error(exc)
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        args = {"prompt": prompt, "max_tokens": body.max_tokens or 16, **_sampling(body)}
        if body.stream:
            return await answer(model.stream(model.complete, **args), True)
        return await answer(await model.run(model.complete, **args), False)

    async def embeddings(request: Request) -> Response:
        try:
            body = wire.decode(await request.body(), wire.EmbeddingRequest)
        except MycoError as exc:
            return _error(exc)
        texts = [body.input] if isinstance(body.input, str) else body.input
        result = await model.run(model.embed, texts)
        if body.encoding_format == "base64":  # what the openai client asks for by default
            for item in result["data"]:
                vector = item["embedding"]
                item["embedding"] = base64.b64encode(
                    struct.pack(f"<{len(vector)}f", *vector)).decode()
        return await answer(result, False)

    async def health(_: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ])


def _with_id(result: dict[str, Any], model_id: str) -> dict[str, Any]:
    """llama-cpp-python names the model by its path; clients expect the id they asked for."""
    result["model"] = model_id
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.runner")
    parser.add_argument("--model", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)

    import uvicorn

    model = Model(args.model, n_ctx=args.n_ctx, threads=args.threads)
    print(f"runner[{args.id}]: loading {args.model} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    model.load()
    print(f"runner[{args.id}]: loaded in {time.perf_counter() - started:.1f} s",
          file=sys.stderr, flush=True)
    uvicorn.run(create_app(model, args.id), uds=args.socket, log_level="warning",
                access_log=False, timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()

"""Parallel slots: one llama.cpp context (`n_seq_max` = slots) decoding many requests at once.

The engine's thread owns the context; each step of its loop: waiting requests take free slots
(the slot whose cached tokens share the longest prefix with the prompt: only the rest is
read); one batch is made of the next token of every generating slot, then chunks of prompts,
at most `n_batch` tokens (a long prompt never freezes the streams); it is decoded and each
slot done reading samples with its own sampler chain.  A request leaves its slot at the end of
generation, a stop string, its token limit, or the step after `cancel` is set.  Other
llama.cpp work (embeddings) runs on the same thread, between steps (`call`).
"""

from __future__ import annotations

import codecs
import collections
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import msgspec


class Finish(msgspec.Struct, frozen=True):
    reason: str  # "stop": end of generation or a stop string; "length": the token limit
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose keys and values the slot already held


Event = str | Finish | BaseException  # a piece of text, then a Finish (or what went wrong)


class Job:
    """One request: `emit` receives its events on the engine's thread; setting `cancel` ends
    it at the next step."""

    def __init__(self, prompt: list[int], max_tokens: int, stops: list[str], sampler: Any,
                 emit: Callable[[Event], object]) -> None:
        self.prompt, self.max_tokens, self.stops = prompt, max_tokens, stops
        self.sampler, self.emit = sampler, emit
        self.cancel = threading.Event()


class _Slot:
    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.cached: list[int] = []  # the tokens this sequence holds in the context
        self.todo: list[int] = []  # tokens to evaluate next: the prompt's rest, or the last sample
        self.job: Job | None = None
        self.reused = self.generated = 0
        self.held = ""  # text that may be the start of a stop string
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could begin a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])), default=0)


class Engine:
    def __init__(self, model: Any, *, slots: int, n_ctx: int, threads: int,
                 n_batch: int = 512) -> None:
        import llama_cpp
        from llama_cpp import _internals

        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max = n_ctx * slots, slots  # each sequence gets n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = threads
        params.swa_full = True  # sliding-window layers keep every token: prefixes stay reusable
        params.no_perf = True
        self._lib, self.model, self.n_batch = llama_cpp, model, n_batch
        self.ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        self._memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self._batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self.slots = [_Slot(i) for i in range(slots)]
        self._inbox: queue.SimpleQueue[Job | tuple[Callable[[], Any], Future[Any]]] = \
            queue.SimpleQueue()
        self._waiting: collections.deque[Job] = collections.deque()
        threading.Thread(target=self._loop, name="llama", daemon=True).start()

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the engine's thread, between two steps."""
        future: Future[Any] = Future()
        self._inbox.put((fn, future))
        return future

    @property
    def busy(self) -> int:
        return sum(s.job is not None for s in self.slots)

    def _loop(self) -> None:
        while True:
            idle = self.busy == 0 and not self._waiting
            try:
                item = self._inbox.get(block=idle)
                while True:
                    if isinstance(item, Job):
                        self._waiting.append(item)
                    else:
                        fn, future = item
                        try:
                            future.set_result(fn())
                        except BaseException as exc:
                            future.set_exception(exc)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            try:
                self._assign()
                self._step()
            except Exception as exc:  # the context's state is unknown: start the slots afresh
                for slot in self.slots:
                    self._lib.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
                    slot.cached, slot.todo = [], []
                    if slot.job is not None:
                        slot.job.emit(exc)
                        slot.job = None

    def _assign(self) -> None:
        free = [s for s in self.slots if s.job is None]
        while free and self._waiting:
            job = self._waiting.popleft()
            if job.cancel.is_set():  # its client left while it waited
                job.emit(Finish("stop", len(job.prompt), 0, 0))
                continue
            slot = max(free, key=lambda s: common_prefix(s.cached, job.prompt))
            free.remove(slot)
            # At least the prompt's last token is evaluated again: its logits are the first sample.
            keep = min(common_prefix(slot.cached, job.prompt), len(job.prompt) - 1)
            if not self._lib.llama_memory_seq_rm(self._memory, slot.seq, keep, -1):
                self._lib.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
                keep = 0
            slot.cached, slot.todo = job.prompt[:keep], job.prompt[keep:]
            slot.job, slot.reused, slot.generated, slot.held = job, keep, 0, ""
            slot.utf8.reset()

    def _step(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.cancel.is_set():
                self._end(slot, "stop")
        active = sorted((s for s in self.slots if s.job is not None), key=lambda s: len(s.todo))
        if not active:
            return
        batch, n, rows = self._batch.batch, 0, []
        for slot in active:  # generating slots first (one token each), then prompt chunks
            take = slot.todo[:self.n_batch - n]
            for i, token in enumerate(take):
                batch.token[n], batch.pos[n] = token, len(slot.cached) + i
                batch.n_seq_id[n], batch.seq_id[n][0], batch.logits[n] = 1, slot.seq, False
                n += 1
            slot.cached += take
            del slot.todo[:len(take)]
            if take and not slot.todo:
                batch.logits[n - 1] = True
                rows.append((slot, n - 1))
        batch.n_tokens = n
        status = self._lib.llama_decode(self.ctx.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status})")
        for slot, row in rows:
            self._next(slot, slot.job.sampler.sample(self.ctx, row))  # type: ignore[union-attr]

    def _next(self, slot: _Slot, token: int) -> None:
        job = slot.job
        assert job is not None
        if self._lib.llama_vocab_is_eog(self.model.vocab, token):
            return self._end(slot, "stop")
        slot.generated += 1
        text = slot.held + slot.utf8.decode(self.model.detokenize([token]))
        cut = min((i for s in job.stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            slot.held = ""
            slot.utf8.reset()
            if cut:
                job.emit(text[:cut])
            return self._end(slot, "stop")
        keep = held_back(text, job.stops)
        if len(text) > keep:
            job.emit(text[:len(text) - keep])
        slot.held = text[len(text) - keep:]
        if slot.generated >= job.max_tokens:
            return self._end(slot, "length")
        slot.todo = [token]

    def _end(self, slot: _Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        rest = slot.held + slot.utf8.decode(b"", final=True)
        if rest and not job.cancel.is_set():
            job.emit(rest)
        job.emit(Finish(reason, len(job.prompt), slot.generated, slot.reused))
        slot.job, slot.todo, slot.held = None, [], ""

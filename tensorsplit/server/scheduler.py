"""Continuous batching across concurrent HTTP requests: one thread owns the engine.

Request handlers (the event loop's thread) submit a `Ticket`; the engine thread admits tickets into
free KV-cache slots of one Generator, steps it, and sends each ticket its events (text, token
log-probabilities, the result, or an error) back to the event loop. A ticket waits in a bounded
queue while every slot is busy (QueueFull past the bound). A cancelled ticket (a client that went
away) leaves its slot before the next step. If the engine fails (a rank died), every ticket in
flight or waiting gets an error (from the caller of run(), naming the rank), and the scheduler stops.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..coordinator.generate import GenerationResult, Generator, Request
from .metrics import Metrics


class QueueFull(Exception):
    pass


@dataclass
class Ticket:
    """One request in the scheduler, and the queue its events arrive on (in the event loop)."""
    request: Request
    loop: asyncio.AbstractEventLoop
    logprobs: int | None = None          # None: none wanted; k: the chosen token's and the top k
    tokens: bool = False                 # a ("token", {"id"}) event per token even without logprobs
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    slot: int | None = None              # its KV-cache slot, once admitted (GET /slots)
    n_decoded: int = 0                   # tokens sampled so far
    id: int = field(default_factory=itertools.count().__next__)

    def emit(self, kind: str, payload) -> None:
        """From the engine thread: ("text", str), ("token", dict), ("done", GenerationResult), ("error", str).
        A token's event comes before the text it completes."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Scheduler:
    def __init__(self, max_queue: int, metrics: Metrics):
        self.max_queue, self.metrics = max_queue, metrics
        self._waiting: deque[Ticket] = deque()
        self._cv = threading.Condition()
        self._running: dict[object, Ticket] = {}
        self._stop = False
        self.failed: str | None = None

    # -- any thread ----------------------------------------------------------------------------
    def submit(self, ticket: Ticket) -> None:
        with self._cv:
            if self.failed:
                raise RuntimeError(self.failed)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            self._waiting.append(ticket)
            self.metrics.waiting = len(self._waiting)
            self._cv.notify()

    def cancel(self, ticket: Ticket) -> None:
        with self._cv:
            ticket.cancelled = True
            self._cv.notify()

    def running_by_slot(self) -> dict[int, Ticket]:
        """The tickets holding a slot now, by slot."""
        with self._cv:
            return {t.slot: t for t in self._running.values()}

    def stop(self) -> None:
        """Finish what is running and waiting, then return from run()."""
        with self._cv:
            self._stop = True
            self._cv.notify()

    def fail(self, message: str) -> None:
        """Every ticket gets `message` as an error (a rank died); new ones are refused."""
        with self._cv:
            self.failed = self.failed or message
            for t in list(self._running.values()) + list(self._waiting):
                t.emit("error", message)
            self._running.clear()
            self._waiting.clear()
            self.metrics.running = self.metrics.waiting = 0
            self._stop = True
            self._cv.notify()

    # -- the engine thread -------------------------------------------------------------------------
    def run(self, gen: Generator, tokenizer) -> None:
        """Step until stopped (or failed). Raises what the engine raised; the caller then fails every
        ticket with fail(), once it knows which rank died (the launcher's line, which clients and
        the log then both show, rather than the collective's own error)."""
        while self._admit(gen):
            t0 = time.perf_counter()
            finished = gen.step(self._on_text, self._on_token)
            self.metrics.observe_step(time.perf_counter() - t0, gen.step_sequences)
            for req, res in finished:
                self._finish(req, res)

    def _admit(self, gen: Generator) -> bool:
        """Drop cancelled tickets, admit waiting ones into free slots, and wait while there is nothing
        to do. False when it is time to stop."""
        with self._cv:
            while True:
                for key, t in list(self._running.items()):
                    if t.cancelled and gen.cancel(key):
                        del self._running[key]
                        self.metrics.cancelled += 1
                while self._waiting and gen.free_slots:
                    t = self._waiting.popleft()
                    if t.cancelled:
                        self.metrics.cancelled += 1
                        continue
                    try:
                        t.slot = gen.add(t.request)
                    except Exception as e:  # noqa: BLE001 - the request's own error, to its client
                        t.emit("error", str(e))
                        continue
                    self._running[t.request.key] = t
                self.metrics.running, self.metrics.waiting = len(self._running), len(self._waiting)
                if gen.active:
                    return True
                if self._stop:
                    return False
                self._cv.wait(0.5)

    def _ticket(self, req: Request) -> Ticket | None:
        return self._running.get(req.key)

    def _on_text(self, req: Request, text: str) -> None:
        t = self._ticket(req)
        if t is not None:
            t.emit("text", text)

    def _on_token(self, req: Request, token: int, logits: torch.Tensor) -> None:
        self.metrics.generation_tokens += 1
        t = self._ticket(req)
        if t is None:
            return
        t.n_decoded += 1
        if t.logprobs is not None:
            t.emit("token", token_logprobs(token, logits, t.logprobs))
        elif t.tokens:
            t.emit("token", {"id": token})

    def _finish(self, req: Request, res: GenerationResult) -> None:
        with self._cv:
            t = self._running.pop(req.key, None)
        self.metrics.prompt_tokens += res.prompt_tokens
        if t is not None:
            t.emit("done", res)


def token_logprobs(token: int, logits: torch.Tensor, top: int) -> dict:
    """The chosen token's log-probability under the model's distribution (softmax of the logits),
    and the `top` most likely tokens': {"id", "logprob", "top": [(id, logprob), ...]}."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    out = {"id": token, "logprob": float(lp[token]), "top": []}
    if top > 0:
        vals, ids = torch.topk(lp, top)
        out["top"] = [(int(i), float(v)) for v, i in zip(vals, ids) if math.isfinite(float(v))]
    return out

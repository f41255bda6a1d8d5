"""From an HTTP request to the scheduler and back, for both APIs: the context check, submitting a
ticket (429 when the queue is full), and reading its events while watching the client.

A non-streamed handler reads events with `watch=request`: the client's disconnect cancels the
ticket, so its slot is free before the next step. A streamed one reads without (Starlette's
StreamingResponse watches the disconnect itself and closes the stream, whose `finally` cancels).
"""
from __future__ import annotations

import asyncio
import uuid

from fastapi import Request

from ..coordinator.generate import GenerationResult, Request as GenRequest
from ..coordinator.sampling import SamplingParams
from .scheduler import QueueFull, Ticket
from .state import ServerState
from .web import ApiError, ClientGone


def context_error(state: ServerState, n_prompt: int, max_tokens: int | None, param: str) -> ApiError:
    """llama-server's exceed_context_size_error, which clients read to trim their prompts."""
    asked = "" if max_tokens is None else f" with max_tokens {max_tokens}"
    return ApiError(400, f"the request ({n_prompt} prompt tokens{asked}) exceeds the available context size "
                         f"({state.n_ctx} tokens): shorten the prompt, ask for fewer tokens or raise -c",
                    "exceed_context_size_error", param, "context_length_exceeded", n_prompt_tokens=n_prompt,
                    n_ctx=state.n_ctx)


def check_prompt(state: ServerState, ids: list[int], param: str = "prompt") -> int:
    """400 for an empty prompt or one that leaves no room in the context; else the room left."""
    if not ids:
        raise ApiError(400, "the prompt is empty (no tokens)", param=param)
    room = state.n_ctx - len(ids)
    if room < 1:
        raise context_error(state, len(ids), None, param)
    return room


def submit(state: ServerState, ids: list[int], params: SamplingParams, max_tokens: int | None, stops: tuple[str, ...],
           *, logprobs: int | None = None, tokens: bool = False, clamp: bool = False,
           param: str = "prompt") -> Ticket:
    """Queue a request. max_tokens None: up to the end of the context. clamp: a max_tokens past the
    context ends there (llama-server's n_predict) instead of being refused (OpenAI's max_tokens)."""
    room = check_prompt(state, ids, param)
    if max_tokens is None or (clamp and max_tokens > room):
        max_tokens = room
    if max_tokens > room:
        raise context_error(state, len(ids), max_tokens, "max_tokens")
    ticket = Ticket(GenRequest(uuid.uuid4().hex, ids, params, max_tokens, stops), asyncio.get_running_loop(),
                    logprobs=logprobs, tokens=tokens)
    try:
        state.scheduler.submit(ticket)
    except QueueFull:
        raise ApiError(429, "too many requests are waiting; try again later", "rate_limit_error") from None
    except RuntimeError as e:
        raise ApiError(503, f"the server failed: {e}", "server_error") from None
    return ticket


class Events:
    """A ticket's events as a handler reads them; close() cancels the ticket (a no-op once done)."""

    def __init__(self, state: ServerState, ticket: Ticket, watch: Request | None = None):
        self.state, self.ticket = state, ticket
        self._gone = asyncio.ensure_future(_client_gone(watch)) if watch is not None else None

    async def get(self) -> tuple[str, object]:
        """The next (kind, payload); ClientGone when the watched client disconnects first."""
        if self._gone is None:
            return await self.ticket.events.get()
        event = asyncio.ensure_future(self.ticket.events.get())
        await asyncio.wait({event, self._gone}, return_when=asyncio.FIRST_COMPLETED)
        if not event.done():
            event.cancel()
            raise ClientGone
        return event.result()

    def close(self) -> None:
        if self._gone is not None:
            self._gone.cancel()
        self.state.scheduler.cancel(self.ticket)


async def collect(state: ServerState, ticket: Ticket, request: Request) -> tuple[str, list[dict], GenerationResult]:
    """A non-streamed request's whole answer: (text, token events, result). 503 if a rank failed."""
    events = Events(state, ticket, watch=request)
    text, tokens = [], []
    try:
        while True:
            kind, payload = await events.get()
            if kind == "text":
                text.append(payload)
            elif kind == "token":
                tokens.append(payload)
            elif kind == "error":
                raise ApiError(503, payload, "server_error")
            else:
                return "".join(text), tokens, payload
    finally:
        events.close()


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects. The body has been read by then, so what arrives on
    `receive` is the disconnect (BodyLimit replays the body, then passes `receive` through)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

"""OpenAI's routes: /v1/completions, /v1/chat/completions and /v1/models, and the same without
the /v1 prefix (as llama-server has them).

Any model name is served (llama-server's rule; many clients hard-code one): responses name the
model that answered. Sampling defaults are OpenAI's (temperature 1, no top-k/top-p/min-p).
"""
from __future__ import annotations

import json
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from ..coordinator.sampling import SamplingParams
from ..errors import TensorsplitError
from . import params
from .scheduler import Ticket
from .schemas import ChatRequest, CompletionRequest
from .state import ServerState, ready
from .tickets import Events, collect, submit
from .web import ApiError

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}    # ours -> OpenAI's finish_reason
DEFAULTS = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)


def register(app: FastAPI, state: ServerState) -> None:
    async def models():
        return {"object": "list", "data": [model_card(state)]}

    async def completions(body: CompletionRequest, request: Request):
        tok = ready(state).tokenizer
        ids = tok.encode(body.text(), add_special=True)
        return await _respond(state, request, body, ids, body.max_tokens, "completion", None)

    async def chat_completions(body: ChatRequest, request: Request):
        ready(state)
        if state.chat is None:
            raise ApiError(400, "this model has no chat template (start the server with --chat-template FILE)")
        try:
            ids = state.chat.encode([m.as_template_message() for m in body.messages])
        except TensorsplitError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await _respond(state, request, body, ids, body.limit(), "chat", top)

    for prefix in ("/v1", ""):
        app.add_api_route(f"{prefix}/models", models, methods=["GET"])
        app.add_api_route(f"{prefix}/completions", completions, methods=["POST"])
        app.add_api_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"])


def model_card(state: ServerState) -> dict:
    """The served model as /v1/models lists it; `meta` (llama-server's) is null while loading."""
    meta = None
    if state.ready:
        meta = {"n_vocab": state.tokenizer.vocab_size, "n_ctx": state.n_ctx,
                "size": os.path.getsize(state.model_path)}
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "tensorsplit",
            "meta": meta}


async def _respond(state: ServerState, request: Request, body, ids: list[int], max_tokens: int | None, kind: str,
                   top_logprobs: int | None):
    ticket = submit(state, ids, params.sampling(body, state.tokenizer, DEFAULTS), max_tokens, body.stops(),
                    logprobs=top_logprobs, param="prompt" if kind == "completion" else "messages")
    meta = {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + ticket.request.key, "created": int(time.time()),
            "model": state.model_id}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(state, ticket, meta, kind, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    text, tokens, res = await collect(state, ticket, request)
    finish = FINISH.get(res.finish_reason, "stop")
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": _logprobs(state, tokens) if top_logprobs is not None else None, "finish_reason": finish}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(res)}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {**meta, "object": "text_completion", "choices": [choice], "usage": _usage(res)}


def _usage(res) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


def token_entry(tok, i: int, lp: float) -> dict:
    """One token as OpenAI's logprobs (and llama-server's completion_probabilities) write it."""
    piece = tok.decode([i], skip_special=False)
    return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}


def _logprobs(state: ServerState, tokens: list[dict]) -> dict:
    tok = state.tokenizer
    return {"content": [{**token_entry(tok, t["id"], t["logprob"]),
                         "top_logprobs": [token_entry(tok, i, lp) for i, lp in t["top"]]} for t in tokens]}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def error_event(message: str) -> bytes:
    """The event a stream ends with when a rank fails (the HTTP status was sent long before)."""
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


async def _stream(state: ServerState, ticket: Ticket, meta: dict, kind: str, include_usage: bool):
    """Server-sent events in OpenAI's chunk format; the last text chunk has the finish_reason, and with
    stream_options.include_usage an extra chunk with no choices carries the usage. An error
    (a rank died) ends the stream with an error event. A client that goes away cancels the ticket."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    logprobs = ticket.logprobs is not None

    def chunk(delta_text: str | None, finish=None, tokens=None, role=False) -> dict:
        if kind == "chat":
            delta = ({"role": "assistant", "content": ""} if role else
                     {} if delta_text is None else {"content": delta_text})
            choice = {"index": 0, "delta": delta, "logprobs": _logprobs(state, tokens) if logprobs and tokens else None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
        out = {**meta, "object": obj, "choices": [choice]}
        if include_usage:
            out["usage"] = None         # OpenAI: null on every chunk but the extra last one
        return out
    events = Events(state, ticket)
    pending: list[dict] = []
    try:
        if kind == "chat":
            yield sse(chunk(None, role=True))
        while True:
            ev, payload = await events.get()
            if ev == "token":
                pending.append(payload)
            elif ev == "text":
                yield sse(chunk(payload, tokens=pending))
                pending = []
            elif ev == "error":
                yield error_event(payload)
                return
            else:
                yield sse(chunk(None if kind == "chat" else "", FINISH.get(payload.finish_reason, "stop"),
                                tokens=pending))
                if include_usage:
                    yield sse({**meta, "object": obj, "choices": [], "usage": _usage(payload)})
                yield b"data: [DONE]\n\n"
                return
    finally:
        events.close()

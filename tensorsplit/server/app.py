"""The HTTP side of `tensorsplit serve`: an OpenAI-compatible API on FastAPI, over the Scheduler.

  GET  /health                 200 when ready, 503 while loading (or after a rank failed)
  GET  /metrics                Prometheus text: requests, tokens, running and waiting, step time
  GET  /v1/models              the one model served
  POST /v1/completions         text completion, streamed (server-sent events) or not
  POST /v1/chat/completions    chat through the model's template (jinja2 sandbox), with logprobs
  POST /tokenize, /detokenize  as llama.cpp's server has them

Errors use OpenAI's error object, {"error": {"message", "type", "param", "code"}}: 400 for a bad or
malformed request, 401 without the --api-key, 404 for another model name, 413 for a body over the
bound, 429 when the queue is full, 503 while loading or after a rank failed. Nothing a client sends
produces a 500 or a traceback, and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..coordinator.generate import Request as GenRequest
from ..coordinator.sampling import SamplingParams
from ..errors import TensorsplitError
from .metrics import Metrics
from .scheduler import QueueFull, Scheduler, Ticket
from .schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

MAX_BODY_BYTES = 8 << 20
CLIENT_GONE = 499     # nginx's status for "the client closed the request", for the request counter
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}    # ours -> OpenAI's finish_reason


@dataclass
class ServerState:
    """What the handlers need; filled in by the engine thread once the model is loaded."""
    model_id: str
    api_key: str | None
    metrics: Metrics
    scheduler: Scheduler
    n_ctx: int = 0
    tokenizer: object | None = None
    chat: object | None = None            # ChatFormatter, or None when the model has no template
    ready: bool = False
    failed: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over MAX_BODY_BYTES gets 413, whether its length is declared or
    it is streamed (chunked). The body is read here, in full, before the app sees it; what is over the
    bound is read and dropped (up to DRAIN_BYTES) so that a client still sending gets the 413, not a
    broken pipe."""
    DRAIN_BYTES = 64 << 20

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        over = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, seen, more = [], 0, True
        while more and not over:
            message = await receive()
            if message["type"] != "http.request":        # the client went away
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
            if seen > self.limit:
                over = True
                break
            chunks.append(message.get("body", b""))
        if over:
            while more and seen <= self.DRAIN_BYTES:
                message = await receive()
                seen += len(message.get("body", b""))
                more = message["type"] == "http.request" and message.get("more_body", False)
            return await _error(413, f"the request body is over {self.limit} bytes")(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()       # after the body: the disconnect, when it comes
        return await self.app(scope, replay, send)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="tensorsplit", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON")
        if first.get("type") == "extra_forbidden":
            return _error(400, f"Unrecognized request argument supplied: {where}", param=where)
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        return _error(400, f"{where}: {msg}" if where else msg, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        return _error(500, "internal error", "server_error")

    @app.middleware("http")
    async def _count_and_authorize(request: Request, call_next):
        path = request.url.path
        if state.api_key and path != "/health" and not _authorized(request, state.api_key):
            response = _error(401, "Incorrect API key provided: pass it as `Authorization: Bearer <key>`",
                              code="invalid_api_key")
        else:
            response = await call_next(request)
        if path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"):
            state.metrics.count_request(path, response.status_code)
        return response

    @app.get("/health")
    async def health():
        if state.failed:
            return JSONResponse({"status": "error", "error": state.failed}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                            "owned_by": "tensorsplit"}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        tok = _ready(state).tokenizer
        ids = tok.encode(body.content, add_special=body.add_special, parse_special=True)
        if body.with_pieces:
            return {"tokens": [{"id": i, "piece": tok.decode([i], skip_special=False)} for i in ids]}
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        tok = _ready(state).tokenizer
        bad = [i for i in body.tokens if not 0 <= i < tok.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})", param="tokens")
        return {"content": tok.decode(body.tokens, skip_special=False)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        ids = _ready(state).tokenizer.encode(body.text(), add_special=True)
        return await _respond(state, request, body, ids, body.max_tokens, "completion", None)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(state, body.model)
        _ready(state)
        if state.chat is None:
            raise ApiError(400, "this model has no chat template (start the server with --chat-template FILE)")
        try:
            ids = state.chat.encode([m.as_template_message() for m in body.messages])
        except TensorsplitError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await _respond(state, request, body, ids, body.limit(), "chat", top)

    return app


def _authorized(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_id:
        raise ApiError(404, f"The model '{name}' does not exist; this server has '{state.model_id}'", param="model",
                       code="model_not_found")


def _ready(state: ServerState) -> ServerState:
    if state.failed:
        raise ApiError(503, f"the server failed: {state.failed}", "server_error")
    if not state.ready:
        raise ApiError(503, "the model is still loading", "server_error")
    return state


def _sampling(body) -> SamplingParams:
    params = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                            top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p,
                            min_p=body.min_p or 0.0, repeat_penalty=body.repeat_penalty or 1.0, seed=body.seed)
    try:
        params.validate()
    except TensorsplitError as e:
        raise ApiError(400, str(e)) from None
    return params


async def _respond(state: ServerState, request: Request, body, ids: list[int], max_tokens: int | None, kind: str,
                   top_logprobs: int | None):
    if not ids:
        raise ApiError(400, "the prompt is empty (no tokens)", param="prompt" if kind == "completion" else "messages")
    room = state.n_ctx - len(ids)
    if max_tokens is None:
        max_tokens = room
    if room < 1 or max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {state.n_ctx} tokens; the prompt has {len(ids)} "
                            f"and max_tokens asks for {max_tokens} more", param="max_tokens",
                       code="context_length_exceeded")
    key = uuid.uuid4().hex
    ticket = Ticket(GenRequest(key, ids, _sampling(body), max_tokens, body.stops()), asyncio.get_running_loop(),
                    logprobs=top_logprobs)
    try:
        state.scheduler.submit(ticket)
    except QueueFull:
        raise ApiError(429, "too many requests are waiting; try again later", "rate_limit_error") from None
    except RuntimeError as e:
        raise ApiError(503, f"the server failed: {e}", "server_error") from None
    meta = {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + key, "created": int(time.time()), "model": state.model_id}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(state, ticket, meta, kind, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    text, tokens = [], []
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        while True:
            event = asyncio.ensure_future(ticket.events.get())
            await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()
                return Response(status_code=CLIENT_GONE)    # nobody reads it; counted in /metrics
            ev, payload = event.result()
            if ev == "text":
                text.append(payload)
            elif ev == "token":
                tokens.append(payload)
            elif ev == "error":
                raise ApiError(503, payload, "server_error")
            else:
                return _final_response(state, meta, kind, "".join(text), tokens, payload, top_logprobs)
    finally:
        gone.cancel()
        state.scheduler.cancel(ticket)     # a no-op once done; frees the slot if the client went away


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects. The body has been read by then, so what arrives on
    `receive` is the disconnect (BodyLimit replays the body, then passes `receive` through); a
    non-streamed handler would otherwise wait for its whole generation with nobody listening."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(res) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


def _logprobs(state: ServerState, tokens: list[dict]) -> dict:
    tok = state.tokenizer

    def entry(i: int, lp: float) -> dict:
        piece = tok.decode([i], skip_special=False)
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}
    return {"content": [{**entry(t["id"], t["logprob"]), "top_logprobs": [entry(i, lp) for i, lp in t["top"]]}
                        for t in tokens]}


def _final_response(state, meta, kind, text, tokens, res, top_logprobs) -> dict:
    finish = FINISH.get(res.finish_reason, "stop")
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": _logprobs(state, tokens) if top_logprobs is not None else None, "finish_reason": finish}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(res)}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {**meta, "object": "text_completion", "choices": [choice], "usage": _usage(res)}


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


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
    pending: list[dict] = []
    try:
        if kind == "chat":
            yield _sse(chunk(None, role=True))
        while True:
            ev, payload = await ticket.events.get()
            if ev == "token":
                pending.append(payload)
            elif ev == "text":
                yield _sse(chunk(payload, tokens=pending))
                pending = []
            elif ev == "error":
                yield _sse({"error": {"message": payload, "type": "server_error", "param": None, "code": None}})
                return
            else:
                yield _sse(chunk(None if kind == "chat" else "", FINISH.get(payload.finish_reason, "stop"),
                                 tokens=pending))
                if include_usage:
                    yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(payload)})
                yield b"data: [DONE]\n\n"
                return
    finally:
        state.scheduler.cancel(ticket)

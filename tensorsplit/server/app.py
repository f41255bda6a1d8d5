"""The HTTP side of `tensorsplit serve`: OpenAI's API and llama-server's own, on FastAPI, over the
Scheduler.

  GET  /health                 200 when ready, 503 while loading (or after a rank failed)
  GET  /metrics                Prometheus text: requests, tokens, running and waiting, step time and size
  GET  /v1/models, /models     the one model served (its --alias, else the file's stem)
  POST /v1/completions         text completion, streamed (server-sent events) or not   } also without
  POST /v1/chat/completions    chat through the model's template (jinja2 sandbox)      } the /v1 prefix
  POST /completion             llama-server's completion (llama_api.py), and its
  GET  /props, /slots          server properties and slot states (/slots with --slots, else 501)
  POST /apply-template         the chat template applied to messages
  POST /tokenize, /detokenize  as llama-server has them

Any model name in a request is served, and `model` may be left out (llama-server's rules).
Errors use OpenAI's error object (web.py): 400 for a bad or malformed request (a prompt that does
not fit: llama-server's exceed_context_size_error), 401 without the --api-key (type
authentication_error), 413 for a body over the bound, 429 when the queue is full, 501 for /slots
without --slots, 503 while loading or after a rank failed. Nothing a client sends produces a 500
or a traceback, and the server keeps serving. A browser's CORS preflight is answered without the
key, for pages from localhost and each --cors-origin (Starlette's CORSMiddleware).
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from . import llama_api, openai_api
from .schemas import DetokenizeRequest, TokenizeRequest
from .state import ServerState, ready
from .web import CLIENT_GONE, ApiError, ClientGone, authorized, cors_options, error_response

OPEN_PATHS = ("/health",)        # answered without the key (load balancers probe it)
UNCOUNTED = ("/health", "/metrics")


def build_app(state: ServerState, cors_origins: list[str] = ()) -> FastAPI:
    app = FastAPI(title="tensorsplit", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(request.url.path, e.status, e.message, e.type, e.param, e.code, **e.extra)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):
        return Response(status_code=CLIENT_GONE)      # nobody reads it; counted in /metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        path = request.url.path
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return error_response(path, 400, "the request body is not valid JSON")
        if first.get("type") == "extra_forbidden":
            return error_response(path, 400, f"Unrecognized request argument supplied: {where}", param=where)
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        return error_response(path, 400, f"{where}: {msg}" if where else msg, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error_response(request.url.path, e.status_code, str(e.detail),
                              "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return error_response(request.url.path, 500, "internal error", "server_error")

    @app.middleware("http")
    async def _count_and_authorize(request: Request, call_next):
        path = request.url.path
        if state.api_key and path not in OPEN_PATHS and not authorized(request.headers.get("authorization", ""),
                                                                       state.api_key):
            # llama-server's type; OpenAI itself says invalid_request_error with this code. Clients
            # of either go by the 401.
            response = error_response(path, 401, "Invalid API key: pass it as `Authorization: Bearer <key>`",
                                      "authentication_error", code="invalid_api_key")
        else:
            response = await call_next(request)
        if path in counted:
            state.metrics.count_request(path, response.status_code)
        return response

    # outside the key check, so that a browser's preflight (which never carries the key) is answered
    app.add_middleware(CORSMiddleware, **cors_options(list(cors_origins)))

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

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        tok = ready(state).tokenizer
        ids = tok.encode(body.content, add_special=body.add_special, parse_special=True)
        if body.with_pieces:
            return {"tokens": [{"id": i, "piece": tok.decode([i], skip_special=False)} for i in ids]}
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        tok = ready(state).tokenizer
        bad = [i for i in body.tokens if not 0 <= i < tok.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})", param="tokens")
        return {"content": tok.decode(body.tokens, skip_special=False)}

    openai_api.register(app, state)
    llama_api.register(app, state)
    counted = {route.path for route in app.routes} - set(UNCOUNTED)
    return app

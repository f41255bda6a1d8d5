"""HTTP plumbing shared by every route: the error object, the body bound, the key check, CORS.

Errors are OpenAI's error object, {"error": {"message", "type", "param", "code"}}, on every route.
On llama-server's own routes (/completion, /props, /slots, /apply-template) `code` is the HTTP
status, as llama-server writes it; on the OpenAI routes it is OpenAI's string code or null. A few
errors carry more fields, as llama-server's do (exceed_context_size_error: n_prompt_tokens, n_ctx).
"""
from __future__ import annotations

import hmac
import re

from starlette.responses import JSONResponse

MAX_BODY_BYTES = 8 << 20
CLIENT_GONE = 499     # nginx's status for "the client closed the request", for the request counter
# the routes whose errors carry the HTTP status as `code`, as llama-server's do
NATIVE_PATHS = frozenset({"/completion", "/props", "/slots", "/apply-template"})
# origins a browser may call from without any --cors-origin: pages served from this machine
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


class ApiError(Exception):
    """An error for the client: its HTTP status and OpenAI-style fields, plus any `extra` ones."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.extra = extra


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nobody reads the response."""


def error_response(path: str, status: int, message: str, type_: str = "invalid_request_error", param=None,
                   code=None, **extra) -> JSONResponse:
    if path in NATIVE_PATHS:
        code = status
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code, **extra}},
                        status_code=status)


def authorized(header: str, key: str) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time."""
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def cors_options(origins: list[str]) -> dict:
    """Starlette CORSMiddleware settings: pages from localhost always, plus each --cors-origin (a
    comma-separated list is split; "*" allows any origin; "localhost" names the default). No
    cookies are involved (the key travels in a header), so credentials are not allowed."""
    named = [o.strip().rstrip("/") for item in origins for o in item.split(",") if o.strip()]
    extra = [o for o in named if o != "localhost"]
    return {"allow_origins": ["*"] if "*" in extra else extra, "allow_origin_regex": LOCAL_ORIGINS,
            "allow_methods": ["GET", "POST", "OPTIONS"], "allow_headers": ["*"], "allow_credentials": False}


def check_origin(origin: str) -> None:
    """Raise ValueError for a --cors-origin that cannot match a browser's Origin header."""
    if origin not in ("*", "localhost") and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", origin):
        raise ValueError(f"--cors-origin {origin!r}: give an origin such as https://app.example.com:8443, "
                         "'localhost' or '*'")


class BodyLimit:
    """ASGI middleware: a request body over MAX_BODY_BYTES gets 413, whether its length is declared or
    it is streamed (chunked). The body is read here, in full, before the app sees it; what is over the
    bound is read and dropped (up to DRAIN_BYTES) so that a client still sending gets the 413, not a
    broken pipe. After replaying the body, `receive` is passed through, so the app still sees the
    client's disconnect. Every body is read as JSON whatever its declared type, as llama-server
    reads it (`curl -d` declares a form)."""
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
            response = error_response(scope.get("path", ""), 413, f"the request body is over {self.limit} bytes")
            return await response(scope, receive, send)
        body, replayed = b"".join(chunks), False
        scope = _json_declared(scope)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()       # after the body: the disconnect, when it comes
        return await self.app(scope, replay, send)


def _json_declared(scope: dict) -> dict:
    """The scope with its Content-Type made application/json: no route here takes anything else."""
    headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
    return {**scope, "headers": headers + [(b"content-type", b"application/json")]}

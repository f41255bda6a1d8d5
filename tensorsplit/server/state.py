"""What every handler reads: the served model, its tokenizer and template, the scheduler, the flags."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .metrics import Metrics
from .scheduler import Scheduler
from .web import ApiError


@dataclass
class ServerState:
    """Filled in by the engine thread once the model is loaded (tokenizer, chat, n_ctx, ready)."""
    model_id: str                         # the name /v1/models reports (--alias, else the file's stem)
    model_path: str
    api_key: str | None
    metrics: Metrics
    scheduler: Scheduler
    n_slots: int = 1
    slots_endpoint: bool = False          # --slots: GET /slots answers (else 501, as llama-server)
    n_ctx: int = 0
    tokenizer: object | None = None
    chat: object | None = None            # ChatFormatter, or None when the model has no template
    ready: bool = False
    failed: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def ready(state: ServerState) -> ServerState:
    """The state, once the model serves; 503 while it loads or after a rank failed."""
    if state.failed:
        raise ApiError(503, f"the server failed: {state.failed}", "server_error")
    if not state.ready:
        raise ApiError(503, "the model is still loading", "unavailable_error")
    return state

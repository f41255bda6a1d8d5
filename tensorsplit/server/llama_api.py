"""llama-server's own routes, so that its users' scripts run unchanged:

  POST /completion       text from a prompt (text, token ids, or both mixed), streamed or not,
                         with llama-server's fields: n_predict, n_probs and completion_probabilities,
                         timings, tokens_predicted/evaluated, stop_type, stopping_word, truncated
  GET  /props            the server's properties and /completion's default settings
  GET  /slots            what each KV-cache slot holds (with --slots; else 501, as llama-server)
  POST /apply-template   the chat template applied to messages: {"prompt": ...}

Timings are measured per request inside steps it shares with other requests: prompt_ms runs from
its admission into a slot to its first token, predicted_ms from there to its last. This server
keeps no prompt cache, so cache_n and tokens_cached are 0 and cache_prompt changes nothing.
"""
from __future__ import annotations

import math
from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from ..coordinator.sampling import SamplingParams
from ..errors import TensorsplitError
from . import params
from .llama_schemas import ApplyTemplateRequest, NativeCompletionRequest
from .openai_api import error_event, sse, token_entry
from .state import ServerState, ready
from .tickets import Events, check_prompt, collect, submit
from .web import ApiError

DEFAULTS = SamplingParams()     # llama-server's: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05
SAMPLERS = ["logit_bias", "penalties", "top_k", "top_p", "min_p", "temperature"]   # the chain, in order
STOP_TYPE = {"eos": "eos", "stop": "word", "length": "limit"}


def register(app: FastAPI, state: ServerState) -> None:
    @app.post("/completion")
    async def completion(body: NativeCompletionRequest, request: Request):
        tok = ready(state).tokenizer
        ids = prompt_ids(body.prompt, tok)
        ban_eog = tuple((i, -math.inf) for i in sorted(tok.eog_ids)) if body.ignore_eos else ()
        sp = params.sampling(body, tok, DEFAULTS, ban_eog)
        n = body.limit()
        if n == 0:      # llama-server only fills its prompt cache then; there is none here
            check_prompt(state, ids)
            return _final(state, body, sp, ids, "", [], None)
        ticket = submit(state, ids, sp, n, body.stops(), logprobs=body.n_probs or None, tokens=True, clamp=True)
        if body.stream:
            return StreamingResponse(_stream(state, body, sp, ids, ticket), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, tokens, res = await collect(state, ticket, request)
        return {**_final(state, body, sp, ids, text, tokens, res), "id_slot": ticket.slot}

    @app.get("/props")
    async def props():
        ready(state)
        return {"default_generation_settings": {"id": 0, "n_ctx": state.n_ctx, "speculative": False,
                                                "is_processing": False, "params": settings(DEFAULTS, -1, (), 0)},
                "total_slots": state.n_slots, "model_alias": state.model_id, "model_path": state.model_path,
                "chat_template": state.chat.template.text if state.chat is not None else "",
                "modalities": {"vision": False, "audio": False}, "build_info": f"tensorsplit {_version()}",
                "is_sleeping": False}

    @app.get("/slots")
    async def slots(fail_on_no_slot: int = 0):
        if not state.slots_endpoint:
            raise ApiError(501, "the slots endpoint is off: start the server with --slots", "not_supported_error")
        ready(state)
        running = state.scheduler.running_by_slot()
        if fail_on_no_slot and len(running) >= state.n_slots:
            raise ApiError(503, "no slot is free", "unavailable_error")
        out = []
        for i in range(state.n_slots):
            t = running.get(i)
            req = t.request if t else None
            n_decoded = t.n_decoded if t else 0          # read once: the engine thread moves it on
            out.append({"id": i, "id_task": t.id if t else -1, "n_ctx": state.n_ctx, "speculative": False,
                        "is_processing": t is not None,
                        "params": settings(req.params, req.max_tokens, req.stop, t.logprobs or 0) if t
                        else settings(DEFAULTS, -1, (), 0),
                        "next_token": {"has_next_token": t is not None,
                                       "n_remain": req.max_tokens - n_decoded if t else -1,
                                       "n_decoded": n_decoded}})
        return out

    @app.post("/apply-template")
    async def apply_template(body: ApplyTemplateRequest):
        ready(state)
        if state.chat is None:
            raise ApiError(400, "this model has no chat template (start the server with --chat-template FILE)")
        try:
            return {"prompt": state.chat.template.render([m.as_template_message() for m in body.messages])}
        except TensorsplitError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None


def prompt_ids(prompt, tok) -> list[int]:
    """llama-server's prompt shapes: text; token ids; ids and text mixed (BOS only when it starts
    with text); a list of prompts, of which this server takes exactly one. Text is tokenized with
    special tokens parsed, as llama-server does."""
    if isinstance(prompt, str):
        return tok.encode(prompt, add_special=True, parse_special=True)
    several = any(isinstance(p, list) for p in prompt) or (len(prompt) > 0 and all(isinstance(p, str) for p in prompt))
    if several:
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: {len(prompt)} prompts; this server takes one per request", param="prompt")
        return prompt_ids(prompt[0], tok)
    ids: list[int] = []
    for j, part in enumerate(prompt):
        if isinstance(part, str):
            ids += tok.encode(part, add_special=j == 0, parse_special=True)
        elif 0 <= part < tok.vocab_size:
            ids.append(part)
        else:
            raise ApiError(400, f"prompt: token id {part} is outside the vocabulary (0..{tok.vocab_size - 1})",
                           param="prompt")
    return ids


def settings(p: SamplingParams, n_predict: int | None, stop, n_probs: int, seed: int | None = None) -> dict:
    """Sampling settings as llama-server's generation_settings writes them (a banned token's bias,
    -inf, as false: JSON has no infinity)."""
    return {"n_predict": -1 if n_predict is None else n_predict,
            "seed": seed if seed is not None else (p.seed if p.seed not in (None, -1) else params.LLAMA_RANDOM_SEED),
            "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
            "repeat_last_n": p.repeat_last_n, "repeat_penalty": p.repeat_penalty, "stop": list(stop),
            "n_probs": n_probs, "logit_bias": [[i, False if b == -math.inf else b] for i, b in p.logit_bias],
            "samplers": SAMPLERS}


def _probabilities(tok, tokens: list[dict]) -> list[dict]:
    """completion_probabilities: the chosen token and the n_probs most likely, from the model's own
    distribution (before logit bias and the sampler chain, as llama-server's n_probs)."""
    return [{"id": t["id"], **token_entry(tok, t["id"], t["logprob"]),
             "top_logprobs": [{"id": i, **token_entry(tok, i, lp)} for i, lp in t["top"]]} for t in tokens]


def _timings(res) -> dict:
    prompt_ms, predicted_ms = res.prefill_s * 1e3, res.decode_s * 1e3
    n_prompt, n_predicted = res.prompt_tokens, res.completion_tokens
    return {"cache_n": 0, "prompt_n": n_prompt, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / n_prompt, "prompt_per_second": n_prompt / prompt_ms * 1e3 if prompt_ms else 0.0,
            "predicted_n": n_predicted, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / n_predicted if n_predicted else 0.0,
            "predicted_per_second": n_predicted / predicted_ms * 1e3 if predicted_ms else 0.0}


def _final(state: ServerState, body: NativeCompletionRequest, sp: SamplingParams, ids: list[int], text: str,
           tokens: list[dict], res) -> dict:
    """The whole answer (non-streamed), or the stream's last event; res None: nothing generated."""
    tok = state.tokenizer
    out = {"index": 0, "content": text, "tokens": [t["id"] for t in tokens] if body.return_tokens or body.stream
           else [], "id_slot": -1, "stop": True, "model": state.model_id,
           "tokens_predicted": res.completion_tokens if res else 0, "tokens_evaluated": res.prompt_tokens if res else 0,
           "generation_settings": {**settings(sp, body.limit(), body.stops(), body.n_probs, res.seed if res else None),
                                   "n_ctx": state.n_ctx, "model": state.model_id, "stream": body.stream,
                                   "ignore_eos": body.ignore_eos},
           "prompt": tok.decode(ids, skip_special=False), "has_new_line": "\n" in text,
           "truncated": bool(res) and res.finish_reason == "length" and len(ids) + res.completion_tokens >= state.n_ctx,
           "stop_type": STOP_TYPE[res.finish_reason] if res else "limit",
           "stopping_word": res.stop_string if res else "", "tokens_cached": 0,
           "timings": _timings(res) if res else _timings_none()}
    if body.n_probs:
        out["completion_probabilities"] = _probabilities(tok, tokens)
    return out


def _timings_none() -> dict:
    return {k: 0 for k in ("cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
                           "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second")}


async def _stream(state: ServerState, body: NativeCompletionRequest, sp: SamplingParams, ids: list[int], ticket):
    """llama-server's stream: `data: {"content", "tokens", "stop": false, ...}` events, then one with
    "stop": true and the whole answer's fields; no [DONE] (that marker is OpenAI's)."""
    events = Events(state, ticket)
    pending: list[dict] = []
    try:
        while True:
            kind, payload = await events.get()
            if kind == "token":
                pending.append(payload)
            elif kind == "text":
                chunk = {"index": 0, "content": payload, "tokens": [t["id"] for t in pending], "stop": False,
                         "id_slot": ticket.slot}
                if body.n_probs:
                    chunk["completion_probabilities"] = _probabilities(state.tokenizer, pending)
                yield sse(chunk)
                pending = []
            elif kind == "error":
                yield error_event(payload)
                return
            else:
                yield sse({**_final(state, body, sp, ids, "", pending, payload), "id_slot": ticket.slot})
                return
    finally:
        events.close()


def _version() -> str:
    try:
        return metadata.version("tensorsplit")
    except metadata.PackageNotFoundError:
        return "unknown"

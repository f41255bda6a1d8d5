"""The request bodies of llama-server's own routes (/completion, /apply-template), as pydantic models.

Defaults are llama-server's (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, n_predict -1 =
to the end of the context). llama-server ignores fields it does not know; here, as on the OpenAI
routes, an unknown field is refused (a typo would silently change nothing), and the fields of
llama.cpp samplers this server does not have (mirostat, DRY, XTC, typical-p, ...) are accepted only
at the value that turns them off, so that a script sending llama-server's full set of defaults
runs unchanged and none gets something other than what it asked for.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from .schemas import MAX_TOP_LOGPROBS, Message, check_stop

MAX_STOP_NATIVE = 16
ANY = object()          # a field whose value does not matter while its sampler is off
# field -> the value that leaves it without effect here (ANY: every value)
NEUTRAL = {
    "typical_p": 1.0, "typ_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "mirostat": 0,
    "mirostat_tau": ANY, "mirostat_eta": ANY, "dynatemp_range": 0.0, "dynatemp_exponent": ANY,
    "dry_multiplier": 0.0, "dry_base": ANY, "dry_allowed_length": ANY, "dry_penalty_last_n": ANY,
    "dry_sequence_breakers": ANY, "xtc_probability": 0.0, "xtc_threshold": ANY, "top_n_sigma": -1.0,
    "tfs_z": 1.0, "penalize_nl": ANY, "min_keep": 0, "n_indent": 0, "t_max_predict_ms": 0,
    "timings_per_token": False, "post_sampling_probs": False, "return_progress": False, "grammar": "",
    "json_schema": None, "lora": [], "image_data": [], "samplers": None, "response_fields": None,
    "n_keep": ANY,                   # what to keep on a context shift, which this server never does
    "n_discard": ANY, "sse_ping_interval": ANY, "n_cache_reuse": 0, "id_slot": -1, "slot_id": -1, "n_cmpl": 1,
}


class NativeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | list[StrictInt | str | list[StrictInt | str]]
    model: str | None = Field(None, max_length=512)
    n_predict: int = Field(-1, ge=-1)                 # -1: until the end of the context
    max_tokens: int | None = Field(None, ge=-1)       # llama-server's other name for n_predict
    temperature: float = 0.8                          # <= 0: greedy
    top_k: int = 40
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    repeat_last_n: int = Field(64, ge=-1)
    seed: int | None = None                           # -1 or 4294967295: a random seed
    stop: str | list[str] | None = None
    stream: bool = False
    n_probs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    logit_bias: dict | list | None = None
    ignore_eos: bool = False
    cache_prompt: bool = True                         # accepted; this server keeps no prompt cache
    return_tokens: bool = False

    @model_validator(mode="before")
    @classmethod
    def _neutral(cls, data):
        if not isinstance(data, dict):
            return data
        for name, neutral in NEUTRAL.items():
            if name in data:
                value = data[name]
                if neutral is not ANY and value != neutral and not (name == "top_n_sigma" and _number(value) <= 0):
                    raise ValueError(f"{name}: only {neutral!r} is supported (this server has no such sampler "
                                     "or option)")
        return {k: v for k, v in data.items() if k not in NEUTRAL}

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return check_stop(v, MAX_STOP_NATIVE)

    def limit(self) -> int | None:
        """Tokens to generate; None: to the end of the context."""
        n = self.n_predict if self.max_tokens is None or self.n_predict != -1 else self.max_tokens
        return None if n < 0 else n

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def _number(v) -> float:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else 1.0


class ApplyTemplateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1, max_length=1024)
    model: str | None = Field(None, max_length=512)

"""The OpenAI request bodies the server accepts, as pydantic models.

Unknown fields are refused, as OpenAI refuses them ("Unrecognized request argument"); fields
OpenAI has but this server does not implement are accepted only at their neutral value (n=1,
no penalties, no tools), so a client never gets something other than what it asked for.
`top_k`, `min_p` and `repeat_penalty` are llama.cpp-server extensions, and so are logit_bias's
forms other than OpenAI's (params.py). `model` may be left out, as llama-server allows.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_MESSAGES = 1024
MAX_STOP = 4
MAX_STOP_CHARS = 512
MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_stop(v, most: int):
    """A stop field (a string or a list of them): at most `most`, none empty or over MAX_STOP_CHARS."""
    items = [v] if isinstance(v, str) else (v or [])
    if len(items) > most:
        raise ValueError(f"at most {most} stop sequences")
    for s in items:
        if not s or len(s) > MAX_STOP_CHARS:
            raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
    return v


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = Field(None, max_length=512)   # any name: the one model answers (README)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | list | None = None              # checked against the vocabulary in params.py
    user: str | None = Field(None, max_length=512)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return check_stop(v, MAX_STOP)

    @model_validator(mode="after")
    def _neutral(self):
        if self.n != 1:
            raise ValueError("n: only 1 choice per request is supported")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (use repeat_penalty)")
        return self

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)          # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: exactly one prompt per request is supported")
        if self.echo or self.suffix is not None or self.logprobs is not None or (self.best_of or 1) != 1:
            raise ValueError("echo, suffix, logprobs and best_of are not supported on /v1/completions "
                             "(log-probabilities: /v1/chat/completions)")
        return self

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=256)

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools are not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_Strict):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Strict):
    tokens: list[int] = Field(max_length=1 << 20)

"""A request body's sampling fields as SamplingParams, for both APIs, with logit_bias resolved
against the vocabulary.

logit_bias comes in llama-server's forms on every route (it accepts them all on all its routes):
  {"15043": 1.0, "Hello": -2}          OpenAI's object; a key that is not a token id is text
  [[15043, 1.0], ["Hello", false]]     llama.cpp's pairs
Text applies the bias to each of its tokens (tokenized without BOS or special tokens); `false`
bans a token (-inf). Entries for one token add up. A token id outside the vocabulary is refused
(llama-server skips it silently), as is a bias of `true`.
"""
from __future__ import annotations

import json
import math

from ..coordinator.sampling import SamplingParams
from ..errors import TensorsplitError
from .web import ApiError

# a seed of 2**32 - 1 is llama-server's "random" (LLAMA_DEFAULT_SEED), which /props reports
LLAMA_RANDOM_SEED = 0xFFFFFFFF


def logit_bias(raw, tokenizer) -> tuple[tuple[int, float], ...]:
    if not raw:
        return ()
    def bad(why: str) -> ApiError:
        return ApiError(400, f"logit_bias: {why}", param="logit_bias")
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, list) and all(isinstance(p, list) and len(p) == 2 for p in raw):
        pairs = raw
    else:
        raise bad('give {"token id or text": bias, ...} or [[token id or text, bias], ...]')
    out: list[tuple[int, float]] = []
    for what, bias in pairs:
        if isinstance(what, bool) or not isinstance(what, (int, str)):
            raise bad(f"{json.dumps(what)} is neither a token id nor text")
        if bias is True or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise bad(f"the bias of {json.dumps(what)} is {json.dumps(bias)}; give a finite number, or false to "
                      "ban the token")
        value = -math.inf if bias is False else float(bias)
        if isinstance(what, str) and what.strip().lstrip("-").isdigit():
            what = int(what)
        ids = [what] if isinstance(what, int) else tokenizer.encode(what, add_special=False)
        for i in ids:
            if not 0 <= i < tokenizer.vocab_size:
                raise ApiError(400, f"logit_bias: token id {i} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                               param="logit_bias")
            out.append((i, value))
    return tuple(out)


def sampling(body, tokenizer, defaults: SamplingParams, extra_bias: tuple = ()) -> SamplingParams:
    """SamplingParams from the body's fields (a field left out or null: the route's default), with
    `extra_bias` pairs after the body's logit_bias (ignore_eos); validated, 400 naming the field."""
    def pick(name: str):
        value = getattr(body, name, None)
        return getattr(defaults, name) if value is None else value
    seed = pick("seed")
    params = SamplingParams(temperature=pick("temperature"), top_k=pick("top_k"), top_p=pick("top_p"),
                            min_p=pick("min_p"), repeat_penalty=pick("repeat_penalty"),
                            repeat_last_n=pick("repeat_last_n"), seed=-1 if seed == LLAMA_RANDOM_SEED else seed,
                            logit_bias=logit_bias(getattr(body, "logit_bias", None), tokenizer) + tuple(extra_bias))
    try:
        params.validate()
    except TensorsplitError as e:
        raise ApiError(400, str(e)) from None
    return params

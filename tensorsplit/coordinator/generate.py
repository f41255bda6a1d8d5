"""The generation loop of one sequence: prefill, then sample-decode until a stop condition.

Works on any `forward(ids, positions, slots, logit_rows) -> (m, vocab)` (the Engine); it
knows nothing of devices or ranks. Text is streamed through `on_text` as soon as it is
complete UTF-8 and cannot be the start of a stop string.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import TensorsplitError
from .sampling import Sampler, SamplingParams
from .stopping import StopChecker
from .tokenizer import Tokenizer


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str          # "eos" | "stop" | "length"
    seed: int
    prefill_s: float
    decode_s: float
    token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def prefill(forward, ids: Sequence[int], slot: int, start: int = 0, n_batch: int = 512) -> torch.Tensor:
    """Run the prompt through the model in chunks of n_batch; return the last position's logits (vocab,)."""
    logits = None
    for b in range(0, len(ids), n_batch):
        chunk = torch.tensor(ids[b:b + n_batch], dtype=torch.int64)
        n = chunk.numel()
        pos = torch.arange(start + b, start + b + n)
        last = torch.tensor([n - 1]) if b + n >= len(ids) else torch.zeros(0, dtype=torch.int64)
        out = forward(chunk, pos, torch.full((n,), slot, dtype=torch.int64), last)
        if last.numel():
            logits = out[0]
    assert logits is not None
    return logits


def generate_one(forward, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 max_tokens: int, n_ctx: int, stop: Sequence[str] = (),
                 on_text: Callable[[str], None] | None = None, slot: int = 0, n_batch: int = 512,
                 on_logits: Callable[[torch.Tensor], None] | None = None) -> GenerationResult:
    """on_logits, if given, sees the (vocab,) logits each token is sampled from (for checks and debugging)."""
    if not prompt_ids:
        raise TensorsplitError("the prompt is empty (no tokens)")
    if len(prompt_ids) >= n_ctx:
        raise TensorsplitError(f"the prompt has {len(prompt_ids)} tokens; the context holds {n_ctx} "
                               "(raise -c/--ctx-size)")
    sampler = Sampler(params)
    checker = StopChecker(tokenizer.eog_ids, stop, max_tokens)
    detok = tokenizer.detokenizer()
    history = list(prompt_ids)
    pieces: list[str] = []
    generated: list[int] = []

    def emit(s: str) -> None:
        if s:
            pieces.append(s)
            if on_text:
                on_text(s)

    t0 = time.perf_counter()
    logits = prefill(forward, prompt_ids, slot, n_batch=n_batch)
    t1 = time.perf_counter()
    finish = "length" if max_tokens <= 0 else None
    while finish is None:
        if on_logits:
            on_logits(logits)
        tok = sampler.sample(logits, history)
        history.append(tok)
        generated.append(tok)
        text = "" if tok in tokenizer.eog_ids else detok.push(tok)
        out, finish = checker.push(tok, text)
        emit(out)
        if finish is None and len(history) >= n_ctx:
            finish = "length"
        if finish is None:
            pos = len(history) - 1
            logits = forward(torch.tensor([tok]), torch.tensor([pos]), torch.tensor([slot]), torch.tensor([0]))[0]
    if finish != "stop":
        emit(checker.flush() + (detok.flush() if finish != "eos" else ""))
    t2 = time.perf_counter()
    return GenerationResult("".join(pieces), len(prompt_ids), len(generated), finish, sampler.seed,
                            t1 - t0, t2 - t1, generated)

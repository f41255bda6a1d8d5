"""Generation: continuous batching of many sequences over the engine's KV-cache slots.

Each step packs one token for every decoding sequence and prompt chunks of newly admitted
sequences (up to n_batch tokens), runs one forward on every rank, then samples for each
sequence whose logits came back. A sequence that finishes frees its slot at once, and the
next waiting request takes it (continuous batching, as llama.cpp's server with -np).

Batching does not change results: each sequence has its own slot, positions, sampler and
seed, and attention never crosses slots. It works on any
`forward(ids, positions, slots, logit_rows) -> (m, vocab)` (the Engine) and knows nothing of
devices or ranks.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

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
    prefill_s: float            # admission to first sampled token
    decode_s: float             # first sampled token to finish
    token_ids: list[int] = field(default_factory=list)
    stop_string: str = ""       # the stop string that ended it (finish_reason "stop")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Request:
    key: object                 # the caller's handle (an id, an index)
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()


class _Seq:
    """A request in flight: its slot, sampler, stop checker and decoded text."""

    def __init__(self, req: Request, slot: int, tokenizer: Tokenizer):
        self.req, self.slot = req, slot
        self.sampler = Sampler(req.params)
        self.checker = StopChecker(tokenizer.eog_ids, req.stop, req.max_tokens)
        self.detok = tokenizer.detokenizer()
        self.history = list(req.prompt_ids)
        self.generated: list[int] = []
        self.pieces: list[str] = []
        self.prefilled = 0          # prompt tokens already in the cache
        self.pending: int | None = None   # sampled token not yet fed to the model
        self.t_admit = time.perf_counter()
        self.t_first: float | None = None


class Generator:
    """Continuous batching over n_slots KV-cache slots. Incremental: add() a request into a free slot,
    step() runs one forward and samples, cancel() frees a slot at once; run() drives a whole list."""

    def __init__(self, forward: Callable, tokenizer: Tokenizer, n_slots: int, n_ctx: int, n_batch: int = 512):
        self.forward, self.tok = forward, tokenizer
        self.n_slots, self.n_ctx, self.n_batch = n_slots, n_ctx, n_batch
        self.active: list[_Seq] = []
        self._free = list(range(n_slots))[::-1]
        self.step_sequences = 0     # sequences the last step fed tokens for (decode rows and prompt chunks)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def check(self, req: Request) -> None:
        """User-facing checks of one request, before it is admitted."""
        if not req.prompt_ids:
            raise TensorsplitError("the prompt is empty (no tokens)")
        if len(req.prompt_ids) >= self.n_ctx:
            raise TensorsplitError(f"the prompt has {len(req.prompt_ids)} tokens; the context holds {self.n_ctx} "
                                   "(raise -c/--ctx-size)")

    def add(self, req: Request) -> int:
        """Admit a request into a free slot (there must be one); returns the slot."""
        self.check(req)
        assert self._free, "no free slot"
        self.active.append(_Seq(req, self._free.pop(), self.tok))
        return self.active[-1].slot

    def cancel(self, key) -> bool:
        """Drop the request `key` and free its slot now; False if it is not active."""
        for s in self.active:
            if s.req.key == key:
                self.active.remove(s)
                self._free.append(s.slot)
                return True
        return False

    def step(self, on_text=None, on_token=None) -> list[tuple[Request, GenerationResult]]:
        """One forward over the active sequences; samples each sequence whose logits came back.
        on_text(request, text) as text becomes safe to show; on_token(request, token id, logits)
        for each sampled token. Returns the requests that finished, with their results."""
        finished = []
        for seq, logits in self._step(self.active):
            finish = self._sample(seq, logits, on_text, on_token)
            if finish:
                self.active.remove(seq)
                self._free.append(seq.slot)
                finished.append((seq.req, self._result(seq, finish)))
        return finished

    def run(self, requests: Iterable[Request], on_done: Callable[[Request, GenerationResult], None],
            on_text: Callable[[Request, str], None] | None = None,
            on_logits: Callable[[Request, torch.Tensor], None] | None = None) -> None:
        """Generate for every request, taking new ones from `requests` as slots free up.

        on_done(request, result) is called as each finishes; on_text(request, text) as text becomes
        safe to show; on_logits(request, logits) with the (vocab,) logits each token is sampled from."""
        waiting: Iterator[Request] = iter(requests)
        exhausted = False
        on_token = (lambda req, tok, logits: on_logits(req, logits)) if on_logits else None
        while True:
            while self._free and not exhausted:
                req = next(waiting, None)
                if req is None:
                    exhausted = True
                    break
                self.add(req)
            if not self.active:
                return
            for req, res in self.step(on_text, on_token):
                on_done(req, res)

    def _step(self, active: list[_Seq]) -> list[tuple[_Seq, torch.Tensor]]:
        """One forward: a token for each decoding sequence, then prompt chunks within the n_batch budget."""
        ids, pos, slots, wants = [], [], [], []   # wants: (seq, index of its logit row among the step's tokens)
        for s in active:
            if s.pending is not None:
                wants.append((s, len(ids)))
                ids.append(s.pending)
                pos.append(len(s.history) - 1)
                slots.append(s.slot)
                s.pending = None
        n_seqs = len(ids)
        budget = max(self.n_batch - len(ids), 0)
        for s in active:
            left = len(s.req.prompt_ids) - s.prefilled
            if left == 0 or budget == 0:
                continue
            take = min(left, budget)
            ids += s.req.prompt_ids[s.prefilled:s.prefilled + take]
            pos += range(s.prefilled, s.prefilled + take)
            slots += [s.slot] * take
            s.prefilled += take
            budget -= take
            n_seqs += 1
            if s.prefilled == len(s.req.prompt_ids):
                wants.append((s, len(ids) - 1))
        self.step_sequences = n_seqs
        logits = self.forward(torch.tensor(ids, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64),
                              torch.tensor(slots, dtype=torch.int64),
                              torch.tensor([w[1] for w in wants], dtype=torch.int64))
        return [(s, logits[i]) for i, (s, _) in enumerate(wants)]

    def _sample(self, s: _Seq, logits: torch.Tensor, on_text, on_token=None) -> str | None:
        tok = s.sampler.sample(logits, s.history)
        if on_token:
            on_token(s.req, tok, logits)
        if s.t_first is None:
            s.t_first = time.perf_counter()
        s.history.append(tok)
        s.generated.append(tok)
        text = "" if tok in self.tok.eog_ids else s.detok.push(tok)
        out, finish = s.checker.push(tok, text)
        if finish is None and len(s.history) >= self.n_ctx:
            finish = "length"
            out += s.checker.flush()
        if finish in ("length",):
            out += s.detok.flush()
        if out:
            s.pieces.append(out)
            if on_text:
                on_text(s.req, out)
        if finish is None:
            s.pending = tok
        return finish

    def _result(self, s: _Seq, finish: str) -> GenerationResult:
        now = time.perf_counter()
        first = s.t_first or now
        return GenerationResult("".join(s.pieces), len(s.req.prompt_ids), len(s.generated), finish,
                                s.sampler.seed, first - s.t_admit, now - first, s.generated, s.checker.stop_string)


def generate_one(forward, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 max_tokens: int, n_ctx: int, stop: Sequence[str] = (),
                 on_text: Callable[[str], None] | None = None, n_batch: int = 512,
                 on_logits: Callable[[torch.Tensor], None] | None = None) -> GenerationResult:
    """One sequence alone, in slot 0."""
    results: list[GenerationResult] = []
    Generator(forward, tokenizer, 1, n_ctx, n_batch).run(
        [Request(0, list(prompt_ids), params, max_tokens, tuple(stop))],
        on_done=lambda r, res: results.append(res),
        on_text=(lambda r, t: on_text(t)) if on_text else None,
        on_logits=(lambda r, lg: on_logits(lg)) if on_logits else None)
    return results[0]

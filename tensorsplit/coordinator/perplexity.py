"""Perplexity with llama-perplexity's convention.

The text is tokenized once. Chunks of n_ctx tokens are each evaluated from an empty cache,
the first token of a chunk replaced by BOS where the model adds BOS, and only the second half
of each chunk is scored: logits at positions n_ctx/2 .. n_ctx-2 predict the tokens after them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import TensorsplitError


@dataclass
class PerplexityResult:
    n_ctx: int
    n_tokens: int                       # tokens in the whole text
    chunk_nll: list[float] = field(default_factory=list)   # summed negative log-likelihood per chunk
    chunk_count: list[int] = field(default_factory=list)   # scored tokens per chunk
    argmax: list[list[int]] = field(default_factory=list)  # top-1 prediction at each scored position

    @property
    def ppl(self) -> float:
        return math.exp(sum(self.chunk_nll) / sum(self.chunk_count))

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "n_ctx": self.n_ctx, "n_tokens": self.n_tokens, "n_chunks": len(self.chunk_nll),
                "scored_tokens": sum(self.chunk_count), "chunk_nll": self.chunk_nll}


def perplexity(forward: Callable, tokens: Sequence[int], n_ctx: int, bos_id: int | None,
               max_chunks: int | None = None, on_chunk: Callable[[int, int, float], None] | None = None
               ) -> PerplexityResult:
    """forward(ids, positions, slots, logit_rows) -> (m, vocab) logits, as Engine.forward."""
    if n_ctx < 4 or n_ctx % 2:
        raise TensorsplitError(f"-c/--ctx-size {n_ctx}: perplexity needs an even context of at least 4")
    n_chunks = len(tokens) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks < 1:
        raise TensorsplitError(f"the text has {len(tokens)} tokens, fewer than one chunk of -c {n_ctx}")
    first = n_ctx // 2
    result = PerplexityResult(n_ctx, len(tokens))
    for c in range(n_chunks):
        chunk = torch.tensor(tokens[c * n_ctx:(c + 1) * n_ctx], dtype=torch.int64)
        if bos_id is not None:
            chunk[0] = bos_id
        rows = torch.arange(first, n_ctx - 1)
        logits = forward(chunk, torch.arange(n_ctx), torch.zeros(n_ctx, dtype=torch.int64), rows)  # (n_ctx/2-1, vocab)
        logp = torch.log_softmax(logits.double(), dim=-1)
        targets = chunk[first + 1:]
        nll = -logp.gather(1, targets[:, None]).sum().item()
        result.chunk_nll.append(nll)
        result.chunk_count.append(len(targets))
        result.argmax.append(logits.argmax(-1).tolist())
        if on_chunk:
            on_chunk(c + 1, n_chunks, result.ppl)
    return result

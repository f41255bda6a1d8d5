"""Tensor-parallel building blocks. Each layer knows only its rank's slice of the weight.

Column-parallel: the weight's output rows are split; each rank computes its own outputs and
no communication is needed. Row-parallel: the input columns are split; each rank computes a
partial sum that `reduce` (an all-reduce handed in by the caller) completes, then the bias is
added once. Vocab-parallel: each rank holds a range of vocabulary rows of the embedding (and
of the output layer). `reduce` is any callable summing a tensor over ranks in place or not:
torch.distributed in a real world, a thread barrier in tests that build every rank in one
process, identity for one rank. The arithmetic (`Numerics`) is handed in the same way.

A linear takes a tensor or a MatmulInput: projections that share an input (q, k, v; gate, up)
share one MatmulInput, so its 8-bit quantization is done once.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..kernels.ops import ops

from .numerics import Numerics
from .quants import MatmulInput, QWeight, get_rows, qmatmul

Reduce = Callable[[torch.Tensor], torch.Tensor]
Input = torch.Tensor | MatmulInput


def no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., d) * rsqrt(mean(x^2) + eps) * weight (d,)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def native_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm in one native op (the sum of squares in double, as ggml takes it)."""
    return ops.rms_norm(x, weight, eps)


class ColumnParallelLinear:
    """y[:, local outputs] = x @ W_local.T (+ b_local). No communication."""

    def __init__(self, weight: QWeight, bias: torch.Tensor | None, numerics: Numerics):
        assert bias is None or bias.shape == (weight.n_rows,), (weight.name, bias.shape, weight.n_rows)
        self.weight, self.bias, self.numerics = weight, bias, numerics

    def __call__(self, x: Input) -> torch.Tensor:
        y = qmatmul(x, self.weight, self.numerics)           # (n, local_out)
        return y + self.bias if self.bias is not None else y


class RowParallelLinear:
    """y = reduce(x[:, local inputs] @ W[:, local inputs].T) + b: the bias is added once, after the sum.

    The partial sums are float64 (the kernels accumulate in double) and so is the all-reduce; the sum
    is rounded to float32 once. One rank's full sum and several ranks' partials then round alike, so
    the result does not depend on the world size or the split (to a tie at float32 rounding), and the
    next layer's 8-bit activation rounding (llama.cpp's numerics) has no summation order to magnify."""

    def __init__(self, weight: QWeight, bias: torch.Tensor | None, reduce: Reduce, numerics: Numerics):
        assert bias is None or bias.shape == (weight.n_rows,), (weight.name, bias.shape, weight.n_rows)
        self.weight, self.bias, self.reduce, self.numerics = weight, bias, reduce, numerics

    def __call__(self, x: Input) -> torch.Tensor:
        y = self.reduce(qmatmul(x, self.weight, self.numerics, wide=True)).float()   # (n, out), summed over ranks
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding:
    """Rows [vocab_start, vocab_start + local_vocab) of token_embd; other ranks supply the rest via reduce."""

    def __init__(self, weight: QWeight, vocab_start: int, reduce: Reduce, world: int):
        self.weight, self.vocab_start, self.reduce, self.world = weight, vocab_start, reduce, world

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (n,) global token ids -> (n, n_embd) float32."""
        if self.world == 1:
            return get_rows(self.weight, ids)
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.weight.n_rows)
        # rows of other ranks' tokens read row 0 and are zeroed: no host sync on which tokens are ours
        rows = get_rows(self.weight, torch.where(mine, local, torch.zeros_like(local)))
        return self.reduce(rows * mine.unsqueeze(1).to(rows.dtype))


class VocabParallelHead:
    """Output layer: this rank's vocabulary slice of the logits, (n, local_vocab). Gathered by the runtime."""

    def __init__(self, weight: QWeight, numerics: Numerics):
        self.weight, self.numerics = weight, numerics

    def __call__(self, h: Input) -> torch.Tensor:
        return qmatmul(h, self.weight, self.numerics)

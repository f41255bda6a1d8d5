"""Tensor-parallel building blocks. Each layer knows only its rank's slice of the weight.

Column-parallel: the weight's output rows are split; each rank computes its own outputs and
no communication is needed. Row-parallel: the input columns are split; each rank computes a
partial sum that `reduce` (an all-reduce handed in by the caller) completes, then the bias is
added once. Vocab-parallel: each rank holds a range of vocabulary rows of the embedding (and
of the output layer). `reduce` is any callable summing a tensor over ranks in place or not:
torch.distributed in a real world, a thread barrier in tests that build every rank in one
process, identity for one rank. The rank's kernels (kernels/base.py) are handed in the same way.

A linear takes a tensor or a MatmulInput: projections that share an input (q, k, v; gate, up)
share one MatmulInput, so its 8-bit quantization is done once.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..kernels.base import Kernels, MatmulInput
from ..kernels.quants import QWeight

Reduce = Callable[[torch.Tensor], torch.Tensor]
Input = torch.Tensor | MatmulInput


def no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


class ColumnParallelLinear:
    """y[:, local outputs] = x @ W_local.T (+ b_local). No communication."""

    def __init__(self, weight: QWeight, bias: torch.Tensor | None, kernels: Kernels):
        assert bias is None or bias.shape == (weight.n_rows,), (weight.name, bias.shape, weight.n_rows)
        self.weight, self.bias, self.kernels = weight, bias, kernels

    def __call__(self, x: Input) -> torch.Tensor:
        y = self.kernels.matmul(x, self.weight)              # (n, local_out)
        return y + self.bias if self.bias is not None else y


class RowParallelLinear:
    """y = reduce(x[:, local inputs] @ W[:, local inputs].T) + b: the bias is added once, after the sum.

    The partial sums are float64 (the kernels accumulate in double) and so is the all-reduce; the sum
    is rounded to float32 once. One rank's full sum and several ranks' partials then round alike, so
    the result does not depend on the world size or the split (to a tie at float32 rounding), and the
    next layer's 8-bit activation rounding (llama.cpp's numerics) has no summation order to magnify."""

    def __init__(self, weight: QWeight, bias: torch.Tensor | None, reduce: Reduce, kernels: Kernels):
        assert bias is None or bias.shape == (weight.n_rows,), (weight.name, bias.shape, weight.n_rows)
        self.weight, self.bias, self.reduce, self.kernels = weight, bias, reduce, kernels

    def __call__(self, x: Input) -> torch.Tensor:
        return self.summed(x).float()                                       # (n, out) float32

    def summed(self, x: Input) -> torch.Tensor:
        """The sum over ranks as it arrives, (n, out): float64 (the caller rounds it, kernels.add_rms_norm
        fused with the residual add), or float32 where a bias was added."""
        y = self.reduce(self.kernels.matmul(x, self.weight, wide=True))
        return y.float() + self.bias if self.bias is not None else y


class VocabParallelEmbedding:
    """Rows [vocab_start, vocab_start + local_vocab) of token_embd; other ranks supply the rest via reduce."""

    def __init__(self, weight: QWeight, vocab_start: int, reduce: Reduce, world: int, kernels: Kernels):
        self.weight, self.vocab_start, self.reduce, self.world, self.kernels = weight, vocab_start, reduce, world, kernels

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (n,) global token ids -> (n, n_embd) float32."""
        if self.world == 1:
            return self.kernels.get_rows(self.weight, ids)
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.weight.n_rows)
        # rows of other ranks' tokens read row 0 and are zeroed: no host sync on which tokens are ours
        rows = self.kernels.get_rows(self.weight, torch.where(mine, local, torch.zeros_like(local)))
        return self.reduce(rows * mine.unsqueeze(1).to(rows.dtype))


class VocabParallelHead:
    """Output layer: this rank's vocabulary slice of the logits, (n, local_vocab). Gathered by the runtime."""

    def __init__(self, weight: QWeight, kernels: Kernels):
        self.weight, self.kernels = weight, kernels

    def __call__(self, h: Input) -> torch.Tensor:
        return self.kernels.matmul(h, self.weight)

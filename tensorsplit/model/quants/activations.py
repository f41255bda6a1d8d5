"""Rounding of matmul inputs the way llama.cpp's ggml backends round them (--numerics llamacpp).

ggml never multiplies a quantized weight by float32 activations: it first quantizes the
activation row to the weight type's "vec_dot type" and takes integer dot products:
  - Q4_0, Q5_0, Q8_0, IQ4_NL -> Q8_0: blocks of 32, d = amax / 127 stored as f16, q = round(x / d);
  - Q4_1, Q5_1             -> Q8_1: the same 8-bit values (its extra field is a sum, not a rounding);
  - K-quants, IQ4_XS       -> Q8_K: blocks of 256, d = amax / 127 kept in f32;
  - F16 / BF16 weights     -> the activations rounded to f16 / bf16.
See model/numerics.py for why this is optional and what else that mode rounds.

Row-parallel shards cut the input only on weight-block boundaries, which are multiples of these
activation blocks, so a sharded forward rounds exactly as an unsharded one does.
"""
from __future__ import annotations

import torch

from .. import numerics
from .qtypes import QType

_Q8_0_INPUT = {QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.IQ4_NL}
_Q8_K_INPUT = {QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_XS}


def _round_8bit(x2: torch.Tensor, block: int, f16_scale: bool) -> torch.Tensor:
    """x2 (M, K) float32, K a multiple of block -> q * d per block, q = round(x / d) in [-127, 127]."""
    xb = x2.reshape(x2.shape[0], -1, block)                       # (M, K / block, block)
    d = xb.abs().amax(-1, keepdim=True) / 127.0                   # (M, K / block, 1)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))        # ggml: id = d ? 1/d : 0
    q = torch.round(xb * inv).clamp_(-127, 127)
    if f16_scale:
        d = d.half().float()
    return (q * d).reshape(x2.shape)


def round_inputs(x2: torch.Tensor, qtype: QType) -> torch.Tensor:
    """The activations x2 (M, n_cols) float32 as a quantized matmul against `qtype` will see them."""
    if not numerics.llamacpp():
        return x2
    if qtype in _Q8_0_INPUT:
        return _round_8bit(x2, 32, f16_scale=True)
    if qtype in _Q8_K_INPUT:
        return _round_8bit(x2, 256, f16_scale=False)
    if qtype == QType.F16:
        return x2.half().float()
    if qtype == QType.BF16:
        return x2.bfloat16().float()
    return x2                                                     # F32: ggml multiplies in float32

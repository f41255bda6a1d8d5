"""Rounding of matmul inputs the way llama.cpp's ggml backends round them (numerics "llamacpp"), for
the torch path (weights in GGUF layout, when the native kernels are unavailable). The native
kernels quantize the same way in C++ (kernels/csrc/kernel_body.h, quantize_rows).

ggml never multiplies a quantized weight by float32 activations: it first quantizes the
activation row to the weight type's "vec_dot type" and takes integer dot products:
  - Q4_0, Q5_0, Q8_0, IQ4_NL, MXFP4 -> Q8_0: blocks of 32, q = round(x * 127 / amax), d = amax / 127 as f16;
  - Q4_1, Q5_1             -> Q8_1: the same 8-bit values (its extra field is a sum, not a rounding);
  - K-quants, IQ4_XS       -> Q8_K: blocks of 256, iscale = -127 / (the signed value of largest
                              magnitude), q = min(127, round(x * iscale)), d = 1 / iscale in f32;
  - F16 / BF16 weights     -> the activations rounded to f16 / bf16.
Rounding is to nearest even, as ggml's x86 code rounds.

Row-parallel shards cut the input only on weight-block boundaries, which are multiples of these
activation blocks, so a sharded forward rounds exactly as an unsharded one does.
"""
from __future__ import annotations

import torch

from .qtypes import QType

Q8_0_INPUT = frozenset({QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.IQ4_NL, QType.MXFP4})
Q8_K_INPUT = frozenset({QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_XS})
# weight type -> the rounding its input gets (types sharing one share a rounded copy of the input)
ROUNDING_KIND = {**{t: "q8_0" for t in Q8_0_INPUT}, **{t: "q8_k" for t in Q8_K_INPUT},
                 QType.F16: "f16", QType.BF16: "bf16", QType.F32: "f32"}


def _round_q8_0(x2: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) float32, K a multiple of 32 -> q * d per block of 32 (ggml's quantize_row_q8_0)."""
    xb = x2.reshape(x2.shape[0], -1, 32)                          # (M, K / 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)                        # (M, K / 32, 1)
    # (a scalar / tensor in torch is reciprocal-then-multiply, rounded twice: divide tensors instead)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)
    d = (amax / 127.0).half().float()
    return (q * d).reshape(x2.shape)


def _round_q8_k(x2: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) float32, K a multiple of 256 -> q * d per block of 256 (ggml's quantize_row_q8_K)."""
    xb = x2.reshape(x2.shape[0], -1, 256)
    pick = xb.abs().argmax(-1, keepdim=True)                      # first index of the largest magnitude
    mx = xb.gather(-1, pick)                                      # its signed value
    iscale = torch.where(mx != 0, torch.full_like(mx, -127.0) / mx, torch.zeros_like(mx))
    q = torch.round(xb * iscale).clamp_(max=127)
    d = torch.where(mx != 0, torch.ones_like(mx) / iscale, torch.zeros_like(mx))
    return (q * d).reshape(x2.shape)


def round_inputs(x2: torch.Tensor, qtype) -> torch.Tensor:
    """The activations x2 (M, n_cols) float32 as llama.cpp's matmul against `qtype` sees them."""
    if qtype in Q8_0_INPUT:
        return _round_q8_0(x2)
    if qtype in Q8_K_INPUT:
        return _round_q8_k(x2)
    if qtype == QType.F16:
        return x2.half().float()
    if qtype == QType.BF16:
        return x2.bfloat16().float()
    return x2                                                     # F32: ggml multiplies in float32

"""NumPy statement of what the quantized matmuls compute, independent of tensorsplit's code: gguf-py's
dequantization of the weights, a float64 product, and, for llama.cpp's numerics, a transcription of
ggml's activation quantization (quantize_row_q8_0 / q8_1 / q8_K on x86).

llama.cpp multiplies a quantized weight by an 8-bit activation in integers: per block, the exact
integer sum of code * q_x, then floats. In float64 every such product is exact, so
dequantized_weights @ dequantized_activations (float64) is the exact value of llama.cpp's formula;
the kernels may differ from it only by their float32 roundings. One term is not a product of the
two dequantized tensors: Q4_1 / Q5_1 weights take their min times Q8_1's block sum s, which ggml
stores rounded to f16; `q8_1_sum_f16` adds that rounding. And MXFP4's block scale d_x * 2^(e - 128) is
a float32 product that is exact only while it is a normal float32: `matmul_llamacpp_mxfp4` keeps its rounding.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

Q8_0_INPUT = (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.IQ4_NL, Q.MXFP4)
Q8_1_INPUT = (Q.Q4_1, Q.Q5_1)
Q8_K_INPUT = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS)
EPS32 = 2.0 ** -24


def quantize_q8_0(x: np.ndarray):
    """x (M, K) float32 -> q (M, K) int, d (M, K/32) float64 (the f16-rounded scale), d32 (unrounded)."""
    xb = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1)
    d32 = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int64)                   # half to even, as ggml's x86 code
    d = d32.astype(np.float16).astype(np.float64)
    return q.reshape(x.shape), d, d32


def quantize_q8_k(x: np.ndarray):
    """x (M, K) float32 -> q (M, K) int, d (M, K/256) float64: iscale = -127 / (signed largest |x|)."""
    xb = x.astype(np.float32).reshape(x.shape[0], -1, 256)
    idx = np.abs(xb).argmax(-1)                                          # first of the largest magnitudes
    mx = np.take_along_axis(xb, idx[..., None], -1)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
    q = np.minimum(127, np.rint(xb * iscale[..., None])).astype(np.int64)
    with np.errstate(divide="ignore"):
        d = np.where(mx != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    return q.reshape(x.shape), d.astype(np.float64)


def dense(raw: np.ndarray, qtype) -> np.ndarray:
    """gguf-py's dequantization of (n_rows, row_bytes) blocks, as float64 (n_rows, n_cols)."""
    return dequantize(raw, qtype).astype(np.float64).reshape(raw.shape[0], -1)


def activations_as_seen(x: np.ndarray, qtype) -> np.ndarray:
    """x (M, K) as llama.cpp's matmul against qtype sees it, float64."""
    if qtype in Q8_0_INPUT or qtype in Q8_1_INPUT:
        q, d, _ = quantize_q8_0(x)
        return (q.reshape(x.shape[0], -1, 32) * d[..., None]).reshape(x.shape)
    if qtype in Q8_K_INPUT:
        q, d = quantize_q8_k(x)
        return (q.reshape(x.shape[0], -1, 256) * d[..., None]).reshape(x.shape)
    if qtype == Q.F16:
        return x.astype(np.float16).astype(np.float64)
    if qtype == Q.BF16:                                                  # round to nearest even bf16
        bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return x.astype(np.float64)


def matmul_llamacpp(raw: np.ndarray, qtype, x: np.ndarray, q8_1_sum_f16: bool = True):
    """llama.cpp's y = x @ W.T (float64), and the scale sum(|w| |x_seen|) its roundings are relative to."""
    w = dense(raw, qtype)
    xs = activations_as_seen(x, qtype)
    y = xs @ w.T
    if qtype in Q8_1_INPUT and q8_1_sum_f16:
        # min * s, with s = f16(d32 * sum q) per block, instead of min * sum(q * d16)
        q, d, d32 = quantize_q8_0(x)
        s16 = (d32 * q.reshape(x.shape[0], -1, 32).sum(-1).astype(np.float32)).astype(np.float16).astype(np.float64)
        exact = (q.reshape(x.shape[0], -1, 32) * d[..., None]).sum(-1)
        bs = 20 if qtype == Q.Q4_1 else 24
        mins = raw.reshape(raw.shape[0], -1, bs)[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        y = y + (s16 - exact) @ mins.T
    return y, np.abs(xs) @ np.abs(w).T


# ggml's kvalues_mxfp4: the E2M1 values doubled (the halving is in the scale, 2^(e - 128))
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int64)


def matmul_llamacpp_mxfp4(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_mxfp4_q8_0 (quants.c) in float64 but for its block scale: per block the float32
    product d_x * 2^(e - 128), times the exact integer sum(kvalues[q] * q_x), summed. Where that product
    is a float32 subnormal (e - 128 + log2(d_x) < -126) it has fewer than 24 bits, and llama.cpp's
    result is not the exact product of the dequantized operands. raw: (n_rows, n_blocks * 17) uint8."""
    blocks = raw.reshape(raw.shape[0], -1, 17)
    e = blocks[:, :, 0].astype(np.int32)
    s = np.ldexp(np.float32(1), e - 128).astype(np.float32)                  # (n_rows, nb) 2^(e - 128)
    codes = np.concatenate([blocks[:, :, 1:] & 15, blocks[:, :, 1:] >> 4], -1)  # element j, then j + 16
    kv = KVALUES_MXFP4[codes]                                                 # (n_rows, nb, 32)
    q, d, _ = quantize_q8_0(x)
    q = q.reshape(x.shape[0], -1, 32)
    sumi = np.einsum("mbj,rbj->mrb", q, kv)                                   # (M, n_rows, nb), exact
    scale = d.astype(np.float32)[:, None, :] * s[None, :, :]                 # float32 products, as ggml's
    return (scale.astype(np.float64) * sumi).sum(-1)


def matmul_exact(raw: np.ndarray, qtype, x: np.ndarray):
    """The float64 product of x and the dequantized weights, and sum(|w| |x|)."""
    w = dense(raw, qtype)
    x64 = x.astype(np.float64)
    return x64 @ w.T, np.abs(x64) @ np.abs(w).T

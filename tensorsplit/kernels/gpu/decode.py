"""Triton device functions that decode GGUF blocks in place: one weight element per lane, read
straight from the block bytes as they are in the file (no repacking, no dequantized copy). The
gemv and gemm use this for Q2_K and Q3_K, whose 2-bit codes gemv.py and tiles.py do not read in
words; the byte helpers (_u8, _f16, _e8m0_half, _k4_scale_min) serve those files too.

`decode(row_base, cols, mask, FMT, QK, TS)` -> float32 (BLOCK_N, KC): the weights of BLOCK_N rows
at columns `cols` (1, KC). row_base (BLOCK_N, 1) points at each row's first byte; a row is K / QK
blocks of TS bytes. Each element finds its block (col // QK), its index j inside it, and gathers
the bytes that hold its code, its high bits and its scales; the bytes a block shares (scales, f16
d) are loaded once per element and served from L1. f16 fields are assembled from two byte loads,
since GGUF blocks are 2-byte-aligned at best (an 18-byte Q4_0 block puts every other d at an odd
word).

The bit layouts follow ggml's block structs (the same ones gguf-py's numpy dequantization reads,
which the tests compare against). FMT is the GGML type id, a compile-time constant: each kernel is
specialised to one format.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _u8(p, m):
    """The byte at p as int32 (0 where masked)."""
    return tl.load(p, mask=m, other=0).to(tl.int32)


@triton.jit
def _f16(p, m):
    """The little-endian f16 at p (any alignment) as float32."""
    lo = tl.load(p, mask=m, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=m, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e8m0_half(e):
    """MXFP4's block scale 2^(e - 128) for E8M0 bytes e (int32, 0..255) as float32, exactly, built from
    its bits as ggml's GGML_E8M0_TO_FP32_HALF builds it: from e = 2 on the exponent field e - 1 (up to
    2^127 at e = 255); e = 0, 1 are the subnormals 2^-128, 2^-127 (bit 21, bit 22). No exp2: its
    hardware approximation need not be exact, and may flush subnormals."""
    bits = tl.where(e < 2, 0x00200000 << (e & 1), (e - 1) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _k4_scale_min(s, i, m):
    """Q4_K / Q5_K: the 6-bit scale and min of sub-block i (0..7) from the 12 scale bytes at s.
    i < 4: the low 6 bits of bytes i and i + 4; i >= 4: a nibble of byte i + 4 with the top 2 bits
    of bytes i - 4 and i."""
    a = _u8(s + (i % 4), m)          # byte i (i < 4), byte i - 4 (i >= 4)
    b = _u8(s + 4 + (i % 4), m)      # byte i + 4 (i < 4), byte i (i >= 4)
    c = _u8(s + 8 + (i % 4), m)      # byte i + 4 (i >= 4)
    low = i < 4
    sc = tl.where(low, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(low, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def decode(row_base, cols, mask, FMT: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr):
    """row_base (BLOCK_N, 1) uint8 pointers, cols (1, KC) int32 columns, mask (BLOCK_N, KC)
    -> (BLOCK_N, KC) float32 weights of a Q2_K (FMT 10) or Q3_K (FMT 11) weight."""
    b = row_base + (cols // QK) * TS         # (BLOCK_N, KC): each element's block
    j = cols % QK                            # (1, KC): its index in the block
    m = mask
    if FMT == 10:     # Q2_K: scales[16] (4-bit scale | 4-bit min) | qs[64] | d | dmin
        sc = _u8(b + j // 16, m)
        q = (_u8(b + 16 + (j // 128) * 32 + j % 32, m) >> (2 * ((j % 128) // 32))) & 3
        w = (_f16(b + 80, m) * (sc & 15).to(tl.float32)) * q.to(tl.float32) \
            - _f16(b + 82, m) * (sc >> 4).to(tl.float32)
    else:             # Q3_K (11): hmask[32] | qs[64] | scales[12] (6-bit, offset 32) | d
        i = j // 16
        lo = (_u8(b + 96 + i % 8, m) >> (4 * (i // 8))) & 15
        hi = (_u8(b + 104 + i % 4, m) >> (2 * (i // 4))) & 3
        sc = (lo | (hi << 4)) - 32
        ql = (_u8(b + 32 + (j // 128) * 32 + j % 32, m) >> (2 * ((j % 128) // 32))) & 3
        h = (_u8(b + j % 32, m) >> (j // 32)) & 1          # a set bit means no -4
        w = (_f16(b + 108, m) * sc.to(tl.float32)) * (ql - 4 * (1 - h)).to(tl.float32)
    return w

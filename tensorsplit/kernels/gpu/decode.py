"""Triton device functions that decode GGUF blocks in place: one weight element per lane, read
straight from the block bytes as they are in the file (no repacking, no dequantized copy).

`decode(row_base, cols, mask, tab_ptr, FMT, QK, TS)` -> float32 (BLOCK_N, KC): the weights of
BLOCK_N rows at columns `cols` (1, KC). row_base (BLOCK_N, 1) points at each row's first byte; a
row is K / QK blocks of TS bytes. Each element finds its block (col // QK), its index j inside it,
and gathers the bytes that hold its code, its high bits and its scales; the bytes a block shares
(scales, f16 d) are loaded once per element and served from L1. f16 fields are assembled from two
byte loads, since GGUF blocks are 2-byte-aligned at best (an 18-byte Q4_0 block puts every other d
at an odd word).

The bit layouts follow ggml's block structs (the same ones gguf-py's numpy dequantization reads,
which the tests compare against). FMT is the GGML type id, a compile-time constant: each kernel is
specialised to one format.
"""
from __future__ import annotations

import triton
import triton.language as tl

# GGML type ids (gguf.GGMLQuantizationType), the values FMT takes
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
IQ4_NL, IQ4_XS = 20, 23

# llama.cpp's kvalues_iq4nl: the 16 non-linear levels of IQ4_NL and IQ4_XS codes (int8)
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@triton.jit
def _u8(p, m):
    """The byte at p as int32 (0 where masked)."""
    return tl.load(p, mask=m, other=0).to(tl.int32)


@triton.jit
def _i8(p, m):
    """The byte at p as a signed int8, widened to int32."""
    return tl.load(p, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.int32)


@triton.jit
def _f16(p, m):
    """The little-endian f16 at p (any alignment) as float32."""
    lo = tl.load(p, mask=m, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=m, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble(p, j, m):
    """Code j of a 32-element run stored as 16 bytes: low nibbles hold 0..15, high nibbles 16..31."""
    return (_u8(p + (j % 16), m) >> ((j // 16) * 4)) & 15


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
def decode(row_base, cols, mask, tab_ptr, FMT: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr):
    """row_base (BLOCK_N, 1) uint8 pointers, cols (1, KC) int32 columns, mask (BLOCK_N, KC)
    -> (BLOCK_N, KC) float32 weights. tab_ptr: IQ4_LEVELS as float32 (IQ4 formats only)."""
    b = row_base + (cols // QK) * TS         # (BLOCK_N, KC): each element's block
    j = cols % QK                            # (1, KC): its index in the block
    m = mask
    if FMT == 2:      # Q4_0: d f16 | qs[16]; w = d * (q - 8)
        w = _f16(b, m) * (_nibble(b + 2, j, m) - 8).to(tl.float32)
    elif FMT == 3:    # Q4_1: d | m | qs[16]; w = d * q + m
        w = _f16(b, m) * _nibble(b + 4, j, m).to(tl.float32) + _f16(b + 2, m)
    elif FMT == 6:    # Q5_0: d | qh u32 | qs[16]; bit j of qh is the code's fifth bit; w = d * (q - 16)
        q = _nibble(b + 6, j, m) | (((_u8(b + 2 + j // 8, m) >> (j % 8)) & 1) << 4)
        w = _f16(b, m) * (q - 16).to(tl.float32)
    elif FMT == 7:    # Q5_1: d | m | qh u32 | qs[16]; w = d * q + m
        q = _nibble(b + 8, j, m) | (((_u8(b + 4 + j // 8, m) >> (j % 8)) & 1) << 4)
        w = _f16(b, m) * q.to(tl.float32) + _f16(b + 2, m)
    elif FMT == 8:    # Q8_0: d | qs int8[32]
        w = _f16(b, m) * _i8(b + 2 + j, m).to(tl.float32)
    elif FMT == 10:   # Q2_K: scales[16] (4-bit scale | 4-bit min) | qs[64] | d | dmin
        sc = _u8(b + j // 16, m)
        q = (_u8(b + 16 + (j // 128) * 32 + j % 32, m) >> (2 * ((j % 128) // 32))) & 3
        w = (_f16(b + 80, m) * (sc & 15).to(tl.float32)) * q.to(tl.float32) \
            - _f16(b + 82, m) * (sc >> 4).to(tl.float32)
    elif FMT == 11:   # Q3_K: hmask[32] | qs[64] | scales[12] (6-bit, offset 32) | d
        i = j // 16
        lo = (_u8(b + 96 + i % 8, m) >> (4 * (i // 8))) & 15
        hi = (_u8(b + 104 + i % 4, m) >> (2 * (i // 4))) & 3
        sc = (lo | (hi << 4)) - 32
        ql = (_u8(b + 32 + (j // 128) * 32 + j % 32, m) >> (2 * ((j % 128) // 32))) & 3
        h = (_u8(b + j % 32, m) >> (j // 32)) & 1          # a set bit means no -4
        w = (_f16(b + 108, m) * sc.to(tl.float32)) * (ql - 4 * (1 - h)).to(tl.float32)
    elif FMT == 12 or FMT == 13:   # Q4_K: d | dmin | scales[12] | qs[128]; Q5_K: ... | qh[32] | qs[128]
        i = j // 32
        sc, mn = _k4_scale_min(b + 4, i, m)
        if FMT == 12:
            q = (_u8(b + 16 + (i // 2) * 32 + j % 32, m) >> (4 * (i % 2))) & 15
        else:
            q = (_u8(b + 48 + (i // 2) * 32 + j % 32, m) >> (4 * (i % 2))) & 15
            q = q | (((_u8(b + 16 + j % 32, m) >> i) & 1) << 4)
        w = (_f16(b, m) * sc) * q.to(tl.float32) - _f16(b + 2, m) * mn
    elif FMT == 14:   # Q6_K: ql[128] | qh[64] | scales int8[16] | d; w = d * sc * (q - 32)
        r = j % 128
        lo = (_u8(b + (j // 128) * 64 + r % 64, m) >> (4 * (r // 64))) & 15
        hi = (_u8(b + 128 + (j // 128) * 32 + r % 32, m) >> (2 * (r // 32))) & 3
        w = (_f16(b + 208, m) * _i8(b + 192 + j // 16, m).to(tl.float32)) * ((lo | (hi << 4)) - 32).to(tl.float32)
    elif FMT == 20:   # IQ4_NL: d | qs[16]; w = d * level[q]
        w = _f16(b, m) * tl.load(tab_ptr + _nibble(b + 2, j, m))
    else:             # IQ4_XS (23): d | scales_h u16 | scales_l[4] | qs[128]; 6-bit scales, offset 32
        i = j // 32
        lo = (_u8(b + 4 + i // 2, m) >> (4 * (i % 2))) & 15
        hi = (_u8(b + 2 + i // 4, m) >> (2 * (i % 4))) & 3
        sc = ((lo | (hi << 4)) - 32).to(tl.float32)
        w = (_f16(b, m) * sc) * tl.load(tab_ptr + _nibble(b + 8 + i * 16, j % 32, m))
    return w

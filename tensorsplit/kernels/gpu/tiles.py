"""The gemm's weight tiles from 16-bit word loads: (BLOCK_N, 32) decoded weights of one K step, for
every format gemv.py reads in words, with the order of their columns.

A word holds 2 to 4 codes of elements that are not neighbours (a Q4_0 word: elements 2i, 2i + 16,
2i + 1, 2i + 17), so the decoded values come out in the words' order; tl.dot does not care in which
order K is summed, so the gemm loads x in the same order (`perm`) instead of putting the weights
back in element order. Per element this is a shift, a mask, a convert and the scale, against the
byte gathers of decode.py (offline.py counts both).

`word_tile(row_base, c, row_ok, tab_ptr, FMT, QK, TS)` -> (w (BLOCK_N, 32) float32, perm (1, 32)
int32): columns c .. c + 31 (c a multiple of 32) of the rows at row_base; column f of w is element
c + perm[f] of the row.

`mx_tile(row_base, c, row_ok, tab_ptr)` -> (v, perm, s): MXFP4, from byte loads (its 17-byte blocks
start at odd bytes every other block). v (BLOCK_N, 32) are the codes' doubled E2M1 values, unscaled
(small integers, exact in fp16), s (BLOCK_N, 1) each row's block scale 2^(e - 128): the gemm applies
s after the dot, since the weights range from 2^-128 to 12 * 2^127 and fp16 holds neither end.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decode import _e8m0_half, _f16, _k4_scale_min, _u8
from .gemv import UNITS, _nibble_code, _nibble_words, _w16

# formats word_tile decodes: those gemv.py reads in words (Q2_K, Q3_K go through decode.py, MXFP4
# through mx_tile)
WORD_TILE_FORMATS = tuple(t for t in UNITS if t != 39)


@triton.jit
def _nibble_order(v0, v1, v2, v3):
    """Four (BLOCK_N, 8) tiles, nibble s of word slot i in v_s, as one (BLOCK_N, 32) tile and the
    element of each of its columns: column f holds word slot f // 4, nibble (f // 2) % 2 + 2 (f % 2),
    which is element 2 (f // 4) + f % 2 + 16 ((f // 2) % 2) of a 32-element run."""
    w = tl.reshape(tl.join(tl.join(v0, v1), tl.join(v2, v3)), (v0.shape[0], 32))
    f = tl.arange(0, 32)[None, :]
    return w, 2 * (f // 4) + f % 2 + 16 * ((f // 2) % 2)


@triton.jit
def _byte_order(v0, v1):
    """Two (BLOCK_N, 16) tiles, the low and the high byte of word slot i, as one (BLOCK_N, 32) tile in
    element order (element 2i + t)."""
    return tl.reshape(tl.join(v0, v1), (v0.shape[0], 32)), tl.arange(0, 32)[None, :]


@triton.jit
def word_tile(row_base, c, row_ok, tab_ptr, FMT: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr):
    b = row_base + (c // QK) * TS                      # (BLOCK_N, 1): the block of this K step
    j0 = c % QK                                        # first element of the step in the block
    i8 = tl.arange(0, 8)[None, :]
    i16 = tl.arange(0, 16)[None, :]
    if FMT == 8:                                       # Q8_0: d | qs int8[32], element order
        d = _f16(b, row_ok)
        w = _w16(b + 2 + 2 * i16, row_ok)
        return _byte_order(d * ((w << 24) >> 24).to(tl.float32), d * ((w << 16) >> 24).to(tl.float32))
    elif FMT == 12 or FMT == 13:                       # Q4_K / Q5_K: sub-block j0 // 32
        sb = j0 // 32
        sc, mn = _k4_scale_min(b + 4, sb, row_ok)
        scale = _f16(b, row_ok) * sc
        offset = _f16(b + 2, row_ok) * mn
        if FMT == 12:
            w = _w16(b + 16 + 32 * (sb // 2) + 2 * i16, row_ok)
        else:
            w = _w16(b + 48 + 32 * (sb // 2) + 2 * i16, row_ok)
            h = _w16(b + 16 + 2 * i16, row_ok)
        shift = 4 * (sb % 2)
        q0 = (w >> shift) & 15
        q1 = (w >> (8 + shift)) & 15
        if FMT == 13:
            q0 = q0 | (((h >> sb) & 1) << 4)
            q1 = q1 | (((h >> (8 + sb)) & 1) << 4)
        return _byte_order(scale * q0.to(tl.float32) - offset, scale * q1.to(tl.float32) - offset)
    elif FMT == 14:                                    # Q6_K: elements r0 .. r0 + 31 of half a
        a = j0 // 128
        r0 = j0 % 128
        ql = _w16(b + 64 * a + r0 % 64 + 2 * i16, row_ok)
        qh = _w16(b + 128 + 32 * a + 2 * i16, row_ok)
        n4 = 4 * (r0 // 64)
        p2 = 2 * (r0 // 32)
        # element 2i + t of the step is in sub-block (128a + r0 + 2i + t) // 16
        sc = tl.load(b + 192 + 8 * a + r0 // 16 + i16 // 8, mask=row_ok, other=0).to(tl.int8, bitcast=True)
        scale = _f16(b + 208, row_ok) * sc.to(tl.float32)
        q0 = ((ql >> n4) & 15) | (((qh >> p2) & 3) << 4)
        q1 = ((ql >> (8 + n4)) & 15) | (((qh >> (8 + p2)) & 3) << 4)
        return _byte_order(scale * (q0 - 32).to(tl.float32), scale * (q1 - 32).to(tl.float32))
    else:                                              # the 32-element nibble runs
        if FMT == 23:                                  # IQ4_XS: sub-block j0 // 32, scale offset 32
            sb = j0 // 32
            lo = (tl.load(b + 4 + sb // 2, mask=row_ok, other=0).to(tl.int32) >> (4 * (sb % 2))) & 15
            sc6 = (lo | (((_w16(b + 2, row_ok) >> (2 * sb)) & 3) << 4)) - 32
            d = _f16(b, row_ok) * sc6.to(tl.float32)
            w = _w16(b + 8 + 16 * sb + 2 * i8, row_ok)
            qh_lo = tl.zeros(row_ok.shape, dtype=tl.int32)   # no fifth bits
            qh_hi = qh_lo
        else:
            d = _f16(b, row_ok)
            w, qh_lo, qh_hi = _nibble_words(b, i8, row_ok, FMT)
        five: tl.constexpr = FMT == 6 or FMT == 7
        q0 = _nibble_code(w, qh_lo, qh_hi, i8, 0, five)
        q1 = _nibble_code(w, qh_lo, qh_hi, i8, 1, five)
        q2 = _nibble_code(w, qh_lo, qh_hi, i8, 2, five)
        q3 = _nibble_code(w, qh_lo, qh_hi, i8, 3, five)
        if FMT == 3 or FMT == 7:
            mn = _f16(b + 2, row_ok)
        if FMT == 20 or FMT == 23:
            return _nibble_order(d * tl.load(tab_ptr + q0), d * tl.load(tab_ptr + q1),
                                 d * tl.load(tab_ptr + q2), d * tl.load(tab_ptr + q3))
        elif FMT == 2:
            return _nibble_order(d * (q0 - 8).to(tl.float32), d * (q1 - 8).to(tl.float32),
                                 d * (q2 - 8).to(tl.float32), d * (q3 - 8).to(tl.float32))
        elif FMT == 6:
            return _nibble_order(d * (q0 - 16).to(tl.float32), d * (q1 - 16).to(tl.float32),
                                 d * (q2 - 16).to(tl.float32), d * (q3 - 16).to(tl.float32))
        else:                                          # Q4_1, Q5_1: d * q + m
            return _nibble_order(d * q0.to(tl.float32) + mn, d * q1.to(tl.float32) + mn,
                                 d * q2.to(tl.float32) + mn, d * q3.to(tl.float32) + mn)


@triton.jit
def mx_tile(row_base, c, row_ok, tab_ptr):
    """The MXFP4 block of columns c .. c + 31: byte i holds elements i (low nibble) and i + 16 (high),
    so column f of v is element f // 2 + 16 (f % 2)."""
    b = row_base + (c // 32) * 17
    q = _u8(b + 1 + tl.arange(0, 16)[None, :], row_ok)                  # (BLOCK_N, 16)
    lo = tl.load(tab_ptr + (q & 15))
    hi = tl.load(tab_ptr + (q >> 4))
    v = tl.reshape(tl.join(lo, hi), (lo.shape[0], 32))
    f = tl.arange(0, 32)[None, :]
    return v, f // 2 + 16 * (f % 2), _e8m0_half(_u8(b, row_ok))

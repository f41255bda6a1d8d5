"""The decode-step GEMV in Triton for every format but Q2_K and Q3_K: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
IQ4_NL, IQ4_XS, Q4_K, Q5_K, Q6_K and MXFP4.

matmul.py's generic gemv decodes one weight element per lane with byte loads (decode.py): 26 (Q4_0)
to 60 (Q4_K) instructions per element in its loop on sm_90, several times what streaming the
weights at the memory's rate allows (a 1.1B Q4_0 at an H200's ~4.3 TB/s is ~7.6e12 elements/s;
the SMs issue ~3.3e13 thread instructions/s, so ~4.4 per element). These kernels load the blocks
in 16-bit words (every GGUF block and field starts at an even byte), take 2 to 4 codes out of each
word, and apply a block's or sub-block's scale once per word slot instead of once per element:
6.7 instructions per element for Q4_0 and 7-16 for the others at one row (the compiled code, see
offline.py). The products are the same float32 products of the same dequantized values, summed in
another order. Q2_K and Q3_K (2-bit codes, rare in practice) keep the generic gemv. MXFP4's blocks
are 17 bytes, so half of them start at an odd byte and none of its words is aligned: its word slots
are put together from two byte loads (9.2 instructions per element at one row, against IQ4_NL's 8.8).

A program owns BLOCK_N weight rows and a range of K; it walks K one *unit* at a time (a block of the
32-element formats, an IQ4_XS sub-block, a whole Q4_K / Q5_K block, half of a Q6_K block), holding W
word slots per row, and keeps per-slot float32 partial sums (BLOCK_M, BLOCK_N, W) that it reduces once at the end.
Word slot i of a unit holds bytes 2i and 2i + 1 of the unit's code bytes; which elements those are
is written beside each format.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decode import _e8m0_half, _f16, _k4_scale_min, _u8

# type id -> (elements per unit, word slots per unit W). Q4_K / Q5_K take a whole block per unit, its
# four chunks unrolled, so that a row's scales and d, dmin are read once per block: 14.2 instructions
# per element on sm_90 at one row, against 25.7 with a chunk per unit
UNITS = {2: (32, 8), 3: (32, 8), 6: (32, 8), 7: (32, 8), 20: (32, 8), 8: (32, 16), 12: (256, 16), 13: (256, 16),
         14: (128, 16), 23: (32, 8), 39: (32, 8)}


@triton.jit
def _w16(p, m):
    """(BLOCK_N, W) little-endian 16-bit words at the even byte addresses p, as int32 in 0..65535."""
    return tl.load(p.to(tl.pointer_type(tl.uint16)), mask=m, other=0).to(tl.int32)


@triton.jit
def _nibble_words(b, i, row_ok, FMT: tl.constexpr):
    """(w, qh_lo, qh_hi) of a 32-element block with 4-bit codes in 16 bytes, low nibbles for elements
    0..15 and high nibbles for 16..31: Q4_0 (d | qs), Q4_1 (d | m | qs), Q5_0 (d | qh u32 | qs), Q5_1
    (d | m | qh | qs), IQ4_NL (d | qs), MXFP4 (e u8 | qs). w: word slots i of qs; qh_lo, qh_hi
    (BLOCK_N, 1): the fifth bits of elements 0..15 and 16..31 (Q5_0, Q5_1; zeros elsewhere, unused)."""
    if FMT == 2 or FMT == 20:
        QS: tl.constexpr = 2
    elif FMT == 3:
        QS: tl.constexpr = 4
    elif FMT == 6:
        QS: tl.constexpr = 6
    else:
        QS: tl.constexpr = 8
    if FMT == 39:                     # odd-sized blocks: a word from two byte loads
        w = _u8(b + 1 + 2 * i, row_ok) | (_u8(b + 2 + 2 * i, row_ok) << 8)
    else:
        w = _w16(b + QS + 2 * i, row_ok)
    if FMT == 6 or FMT == 7:
        qh_lo = _w16(b + QS - 4, row_ok)
        qh_hi = _w16(b + QS - 2, row_ok)
    else:
        qh_lo = tl.zeros(row_ok.shape, dtype=tl.int32)
        qh_hi = qh_lo
    return w, qh_lo, qh_hi


@triton.jit
def _nibble_code(w, qh_lo, qh_hi, i, s: tl.constexpr, FIVE: tl.constexpr):
    """Code of nibble s (0..3) of word slot i: element 2i + s // 2 + 16 (s % 2) of the 32-element run
    (low, high nibble of byte 2i, then of byte 2i + 1), with its fifth bit where FIVE."""
    q = (w >> (4 * s)) & 15
    if FIVE:
        if s % 2 == 0:
            q = q | (((qh_lo >> (2 * i + s // 2)) & 1) << 4)
        else:
            q = q | (((qh_hi >> (2 * i + s // 2)) & 1) << 4)
    return q


@triton.jit
def _nibbles32(acc, b, xb, i, row_ok, m_ok, tab_ptr, FMT: tl.constexpr):
    """A Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL or MXFP4 block (_nibble_words): w = d * (q - 8), d * q + m,
    d * (q - 16), d * q + m, d * level[q], kvalue[q] * 2^(e - 128) (the table's doubled E2M1 values,
    the scale exact from 2^-128 to 2^127, decode.py _e8m0_half; scaling a float32 by a power of two
    rounds only where the result is subnormal). MXFP4's scale is read after the codes (read before
    them, ptxas spilled 8 bytes at 16 x rows on sm_90)."""
    if FMT != 39:
        d = _f16(b, row_ok)[None, :, :]
    w, qh_lo, qh_hi = _nibble_words(b, i, row_ok, FMT)
    part = tl.zeros(acc.shape, dtype=tl.float32)
    xsum = tl.zeros((acc.shape[0], 1, acc.shape[2]), dtype=tl.float32)
    for s in tl.static_range(4):
        q = _nibble_code(w, qh_lo, qh_hi, i, s, FMT == 6 or FMT == 7)
        x = tl.load(xb + 2 * i + s // 2 + 16 * (s % 2), mask=m_ok, other=0.0)[:, None, :]
        if FMT == 20 or FMT == 39:
            part += x * tl.load(tab_ptr + q)[None, :, :]
        else:
            part += x * q.to(tl.float32)[None, :, :]
        xsum += x
    if FMT == 2:
        acc += d * (part - 8.0 * xsum)
    elif FMT == 6:
        acc += d * (part - 16.0 * xsum)
    elif FMT == 20:
        acc += d * part
    elif FMT == 39:
        acc += _e8m0_half(_u8(b, row_ok))[None, :, :] * part
    else:                                                # Q4_1, Q5_1: d * q + m
        acc += d * part + _f16(b + 2, row_ok)[None, :, :] * xsum
    return acc


@triton.jit
def _iq4_xs(acc, b, xb, j, i, row_ok, m_ok, tab_ptr):
    """Sub-block j (0..7) of an IQ4_XS block (d | scales_h u16 | scales_l[4] | qs[128]): a 6-bit scale
    (nibble j % 2 of scales_l byte j // 2, with bits 2j, 2j+1 of scales_h on top; offset 32) and codes
    in qs bytes 16j..16j+15, laid out as an IQ4_NL block's. w = d * sc * level[q]. (A whole block per
    unit, its 8 sub-blocks unrolled, spilled on sm_90 at 8 rows.)"""
    lo = (tl.load(b + 4 + j // 2, mask=row_ok, other=0).to(tl.int32) >> (4 * (j % 2))) & 15
    sc = ((lo | (((_w16(b + 2, row_ok) >> (2 * j)) & 3) << 4)) - 32).to(tl.float32)[None, :, :]
    w = _w16(b + 8 + 16 * j + 2 * i, row_ok)
    part = tl.zeros(acc.shape, dtype=tl.float32)
    for s in tl.static_range(4):
        x = tl.load(xb + 2 * i + s // 2 + 16 * (s % 2), mask=m_ok, other=0.0)[:, None, :]
        part += x * tl.load(tab_ptr + _nibble_code(w, w, w, i, s, False))[None, :, :]
    return acc + (_f16(b, row_ok)[None, :, :] * sc) * part


@triton.jit
def _q8_0(acc, b, xb, i, row_ok, m_ok):
    """Block: d f16 | qs int8[32]. Word i: elements 2i (low byte) and 2i + 1 (high byte)."""
    d = _f16(b, row_ok)[None, :, :]
    w = _w16(b + 2 + 2 * i, row_ok)
    lo = ((w << 24) >> 24).to(tl.float32)                  # sign-extended low byte
    hi = ((w << 16) >> 24).to(tl.float32)
    x0 = tl.load(xb + 2 * i, mask=m_ok, other=0.0)[:, None, :]
    x1 = tl.load(xb + 2 * i + 1, mask=m_ok, other=0.0)[:, None, :]
    return acc + d * (x0 * lo[None, :, :] + x1 * hi[None, :, :])


@triton.jit
def _q4_5_k(acc, b, xb, c, i, row_ok, m_ok, FIVE: tl.constexpr):
    """Chunk c (0..3, static) of a Q4_K block (d | dmin | scales[12] | qs[128]) or a Q5_K block (... | qh[32] |
    qs[128]): sub-blocks 2c and 2c + 1, in the low and high nibbles of qs bytes 32c..32c+31. Word i:
    bytes 2i, 2i+1 -> element l = 2i and 2i + 1 of each sub-block; Q5_K's fifth bit of element l of
    sub-block s is bit s of qh byte l. w = d * sc * q - dmin * mn per sub-block."""
    sc0, mn0 = _k4_scale_min(b + 4, 2 * c, row_ok)
    sc1, mn1 = _k4_scale_min(b + 4, 2 * c + 1, row_ok)
    if FIVE:
        w = _w16(b + 48 + 32 * c + 2 * i, row_ok)
        h = _w16(b + 16 + 2 * i, row_ok)
    else:
        w = _w16(b + 16 + 32 * c + 2 * i, row_ok)
    parts0 = tl.zeros(acc.shape, dtype=tl.float32)
    parts1 = tl.zeros(acc.shape, dtype=tl.float32)
    xs0 = tl.zeros((acc.shape[0], 1, acc.shape[2]), dtype=tl.float32)
    xs1 = tl.zeros((acc.shape[0], 1, acc.shape[2]), dtype=tl.float32)
    for t in tl.static_range(2):                           # byte 2i + t: element l = 2i + t
        for n in tl.static_range(2):                       # low nibble: sub-block 2c; high: 2c + 1
            q = (w >> (8 * t + 4 * n)) & 15
            if FIVE:
                q = q | (((h >> (8 * t + 2 * c + n)) & 1) << 4)
            x = tl.load(xb + 32 * n + 2 * i + t, mask=m_ok, other=0.0)[:, None, :]
            if n == 0:
                parts0 += x * q.to(tl.float32)[None, :, :]
                xs0 += x
            else:
                parts1 += x * q.to(tl.float32)[None, :, :]
                xs1 += x
    d = _f16(b, row_ok)[None, :, :]
    dmin = _f16(b + 2, row_ok)[None, :, :]
    acc += (d * sc0[None, :, :]) * parts0 - (dmin * mn0[None, :, :]) * xs0
    return acc + (d * sc1[None, :, :]) * parts1 - (dmin * mn1[None, :, :]) * xs1


@triton.jit
def _q6_k(acc, b, xb, a, i, row_ok, m_ok):
    """Half a (0, 1) of a Q6_K block (ql[128] | qh[64] | scales int8[16] | d): ql bytes 64a..64a+63, qh
    bytes 32a..32a+31. Element r (0..127) of the half: the low 4 bits are nibble r // 64 of ql byte
    r % 64, the high 2 bits pair r // 32 of qh byte r % 32. Word slot i (0..15) of group g (0, 1):
    ql bytes 32g + 2i + t (t = 0, 1) -> elements r = 32g + 2i + t (low nibble) and r + 64 (high
    nibble), whose high bits are pairs g and g + 2 of qh byte 2i + t. w = d * sc[r // 16] * (q - 32)."""
    qh = _w16(b + 128 + 32 * a + 2 * i, row_ok)
    d = _f16(b + 208, row_ok)[None, :, :]
    for g in tl.static_range(2):
        ql = _w16(b + 64 * a + 32 * g + 2 * i, row_ok)
        for n in tl.static_range(2):
            part = tl.zeros(acc.shape, dtype=tl.float32)
            for t in tl.static_range(2):
                lo = (ql >> (8 * t + 4 * n)) & 15
                hi = (qh >> (8 * t + 2 * (g + 2 * n))) & 3
                x = tl.load(xb + 32 * g + 2 * i + t + 64 * n, mask=m_ok, other=0.0)[:, None, :]
                part += x * ((lo | (hi << 4)) - 32).to(tl.float32)[None, :, :]
            # sub-block (32g + 2i + 64n) // 16 of the half
            sc = tl.load(b + 192 + 8 * a + 2 * g + i // 8 + 4 * n, mask=row_ok, other=0).to(tl.int8, bitcast=True)
            acc += (d * sc.to(tl.float32)[None, :, :]) * part
    return acc


@triton.jit
def gemv_words_kernel(x_ptr, w_ptr, tab_ptr, y_ptr, M, N, K, row_bytes, units_per_split,
                      FMT: tl.constexpr, TS: tl.constexpr, UNIT: tl.constexpr, PER_BLOCK: tl.constexpr,
                      W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[split] (M, N) = x[:, this split's units] @ W[rows, the same].T, x (M, K) float32."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    row_ok = (rows < N)[:, None]
    m_ok = ms[:, None] < M
    row_base = w_ptr + rows.to(tl.int64)[:, None] * row_bytes            # (BLOCK_N, 1)
    x_rows = x_ptr + ms[:, None] * K                                     # (BLOCK_M, 1)
    i = tl.arange(0, W)[None, :]                                         # word slots
    u0 = split * units_per_split
    u1 = tl.minimum(u0 + units_per_split, K // UNIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N, W), dtype=tl.float32)
    for u in range(u0, u1):
        blk = u // PER_BLOCK                                             # units per GGUF block
        b = row_base + blk * TS
        xb = x_rows + u * UNIT
        if FMT == 2 or FMT == 3 or FMT == 6 or FMT == 7 or FMT == 20 or FMT == 39:
            acc = _nibbles32(acc, b, xb, i, row_ok, m_ok, tab_ptr, FMT)
        elif FMT == 23:
            acc = _iq4_xs(acc, b, xb, u % 8, i, row_ok, m_ok, tab_ptr)
        elif FMT == 8:
            acc = _q8_0(acc, b, xb, i, row_ok, m_ok)
        elif FMT == 12 or FMT == 13:                     # a whole block: its scales are read once
            for c in tl.static_range(4):
                acc = _q4_5_k(acc, b, xb + 64 * c, c, i, row_ok, m_ok, FMT == 13)
        else:
            acc = _q6_k(acc, b, xb, u % 2, i, row_ok, m_ok)
    y = tl.sum(acc, axis=2)
    tl.store(y_ptr + split.to(tl.int64) * M * N + ms[:, None] * N + rows[None, :], y,
             mask=m_ok & (rows < N)[None, :])

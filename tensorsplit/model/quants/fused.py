"""Fused dequantize-and-multiply for decode steps, compiled by torch.compile (opt-in).

A decode step multiplies a few rows of activations by every weight. The eager path
dequantizes each weight tile to float32 and calls the BLAS: for one row that is several
passes over memory per weight element. Here each format's block decode and the dot product
are written as one expression (codes times x, summed per block, then scaled), which inductor
compiles into a single loop that reads the packed blocks once (on the CPU, C++; on a GPU,
Triton).

Enabled with `set_kernels("compiled")` (`--kernels compiled`); used for steps of at most
MAX_ROWS rows and the formats in MATVEC. Shapes are static: each distinct (format, weight
shape, rows) compiles once per process (seconds; inductor caches the code on disk across
runs); rows are padded to a power of two, so that a batch whose size changes as sequences
finish compiles at most three times per weight shape.
If compilation fails (no C++ compiler, say), a warning is printed once and the eager path
is used from then on. Each matmul this module computes is counted as "compiled" in paths.py,
each one it was asked for and could not compute as "compiled:fallback", so that tests can
tell the fast path from a silent fallback.
"""
from __future__ import annotations

import sys

import torch

from . import paths
from .formats_iq import KVALUES
from .formats_k import scale_min_k4_halves
from .qtypes import QType

MAX_ROWS = 4          # steps with more rows (prompt chunks, big batches) go to dequantize + BLAS: at 16
                      # rows the kernel alone is still faster, but a batch of 16 sequences ran no faster
                      # end to end (scripts/batch_throughput.sh, 27-30 vs 31 tok/s) once compiles count
_mode = "eager"
_compiled: dict = {}
_failed = False


def _f16(b: torch.Tensor, lo: int) -> torch.Tensor:
    """(R, nb, type_size) uint8 -> the float16 field at byte lo as float32 (R, nb, 1)."""
    return b[..., lo:lo + 2].contiguous().view(torch.float16).float()


# Each kernel takes x (M, K) float32 and the packed rows (R, row_bytes) uint8 and returns (M, R).
# Shape of the arithmetic: integer codes times x, summed within a block first, and only then
# scaled by the block's float scale (and offset by its min times the block's sum of x): one
# multiply per weight, which inductor vectorizes. Dequantizing each weight first (w = d * q, then
# x * w) was 2-3 times slower for blocks of 32 (Q6_K's sub-blocks of 16 are the exception).
# Measured on 2 AVX-512 cores, one row of x: Q8_0 8.1, Q4_K 6.7, Q6_K 6.2, Q4_1 6.0, Q5_0 5.0,
# Q5_1 3.7, Q5_K 3.6, IQ4_NL/IQ4_XS 0.9 (a table lookup per weight; eager: 0.13) billion weights/s.
# torch.cat inside a kernel made inductor write a buffer and cost 2-5x. Q2_K and Q3_K: eager.

def _halves_dot(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Blocks of 32 whose elements 0-15 have codes `lo` and 16-31 codes `hi`, each (R, nb, 16):
    (sum over each block of x * code (M, R, nb), sum over each block of x (M, 1, nb))."""
    xv = x.view(x.shape[0], 1, -1, 2, 16)                               # (M, 1, nb, half, 16)
    return (xv[..., 0, :] * lo + xv[..., 1, :] * hi).sum(-1), xv.sum((-1, -2))


def _q5_codes(qh: torch.Tensor, qs: torch.Tensor):
    """Q5_0/Q5_1 codes: qh (R, nb, 4) uint8, a little-endian uint32 whose bit j is the 5th bit of
    element j; qs (R, nb, 16) nibbles as Q4_0's -> codes of elements 0-15 and 16-31, float32."""
    qh = qh.contiguous().view(torch.int32)                              # (R, nb, 1)
    j = torch.arange(16, dtype=torch.int32, device=qs.device)
    lo = (qs & 0x0F) | (((qh >> j) & 1) << 4).to(torch.uint8)
    hi = (qs >> 4) | (((qh >> (j + 16)) & 1) << 4).to(torch.uint8)
    return lo.float(), hi.float()


def _q4_0(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # block: d f16 | qs[16]; element j = low nibble of qs[j], j + 16 = high nibble; w = d * (q - 8)
    b = data.view(data.shape[0], -1, 18)
    qs = b[..., 2:18]
    dot, xsum = _halves_dot(x, (qs & 0x0F).float(), (qs >> 4).float())
    return (_f16(b, 0)[..., 0] * (dot - 8.0 * xsum)).sum(-1)


def _q4_1(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # block: d f16 | m f16 | qs[16]; w = d * q + m
    b = data.view(data.shape[0], -1, 20)
    qs = b[..., 4:20]
    dot, xsum = _halves_dot(x, (qs & 0x0F).float(), (qs >> 4).float())
    return (_f16(b, 0)[..., 0] * dot + _f16(b, 2)[..., 0] * xsum).sum(-1)


def _q5_0(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # block: d f16 | qh[4] | qs[16]; w = d * (q - 16)
    b = data.view(data.shape[0], -1, 22)
    dot, xsum = _halves_dot(x, *_q5_codes(b[..., 2:6], b[..., 6:22]))
    return (_f16(b, 0)[..., 0] * (dot - 16.0 * xsum)).sum(-1)


def _q5_1(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # block: d f16 | m f16 | qh[4] | qs[16]; w = d * q + m
    b = data.view(data.shape[0], -1, 24)
    dot, xsum = _halves_dot(x, *_q5_codes(b[..., 4:8], b[..., 8:24]))
    return (_f16(b, 0)[..., 0] * dot + _f16(b, 2)[..., 0] * xsum).sum(-1)


def _q8_0(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # block: d f16 | qs[32] int8; w = q * d
    b = data.view(data.shape[0], -1, 34)
    dot = (x.view(x.shape[0], 1, -1, 32) * b[..., 2:34].view(torch.int8).float()).sum(-1)   # (M, R, nb)
    return (_f16(b, 0)[..., 0] * dot).sum(-1)


def _k_sub32(x: torch.Tensor, b: torch.Tensor, qh_at: int | None, qs_at: int) -> torch.Tensor:
    """Q4_K (qh_at None) and Q5_K. Super-block b (R, nb, bytes): d f16 | dmin f16 | scales[12] |
    [qh[32]] | qs[128]. Sub-block s = 4a + 2p + t (a, p, t in {0, 1}) of 32 reads qs[32 (2a + p) ...],
    low nibbles for t = 0, high for t = 1; Q5_K's 5th bit of its element l is bit s of qh[l].
    w = d sc[s] q - dmin mn[s], scales and mins from scale_min_k4_halves (one half per a)."""
    R, nb = b.shape[0], b.shape[1]
    d, dmin = _f16(b, 0).unsqueeze(-1), _f16(b, 2).unsqueeze(-1)          # (R, nb, 1, 1)
    scales, mins = scale_min_k4_halves(b[..., 4:16])                      # each a: (R, nb, 4)
    qs = b[..., qs_at:qs_at + 128].reshape(R, nb, 2, 2, 32)               # (R, nb, a, p, 32)
    xv = x.view(x.shape[0], 1, nb, 2, 2, 2, 32)                           # (M, 1, nb, a, p, t, 32)
    if qh_at is not None:
        qh = b[..., qh_at:qh_at + 32].unsqueeze(-2)                       # (R, nb, 1, 32)
        p2 = 2 * torch.arange(2, dtype=torch.uint8, device=b.device).view(2, 1)
    total = 0
    for a in (0, 1):
        sc = d * scales[a].view(R, nb, 2, 2).float()                      # (R, nb, p, t)
        mn = dmin * mins[a].view(R, nb, 2, 2).float()
        q = qs[:, :, a]                                                   # (R, nb, p, 32)
        q0, q1 = q & 0x0F, q >> 4
        if qh_at is not None:
            q0 = q0 | (((qh >> (p2 + 4 * a)) & 1) << 4)
            q1 = q1 | (((qh >> (p2 + 4 * a + 1)) & 1) << 4)
        x0, x1 = xv[:, :, :, a, :, 0], xv[:, :, :, a, :, 1]               # (M, 1, nb, p, 32)
        dot0, dot1 = (x0 * q0.float()).sum(-1), (x1 * q1.float()).sum(-1)   # (M, R, nb, p)
        total = total + (sc[..., 0] * dot0 + sc[..., 1] * dot1
                         - mn[..., 0] * x0.sum(-1) - mn[..., 1] * x1.sum(-1)).sum((-1, -2))
    return total


def _q4_k(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # super-block: d f16 | dmin f16 | scales[12] | qs[128]
    return _k_sub32(x, data.view(data.shape[0], -1, 144), None, 16)


def _q5_k(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # super-block: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
    return _k_sub32(x, data.view(data.shape[0], -1, 176), 16, 48)


def _q6_k(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # super-block: ql[128] | qh[64] | scales[16] int8 | d f16. Element e of half h (e < 128): group
    # g = e // 32, l = e % 32; low 4 bits from ql[64h + l + 32 (g % 2)] (high nibble for g >= 2),
    # top 2 bits (qh[32h + l] >> 2g) & 3; w = d * scales[8h + 2g + l // 16] * (q - 32)
    b = data.view(data.shape[0], -1, 210)
    R, nb = b.shape[0], b.shape[1]
    ql = b[..., 0:128].reshape(R, nb, 2, 2, 2, 16)                        # (R, nb, h, g % 2, l // 16, 16)
    qh = b[..., 128:192].reshape(R, nb, 2, 2, 16)                         # (R, nb, h, l // 16, 16)
    # sub-blocks of 16 are too short for the dot-first shape: scale the codes, then one reduction
    sc = (_f16(b, 208) * b[..., 192:208].contiguous().view(torch.int8).float()).view(R, nb, 2, 4, 2, 1)
    xv = x.view(x.shape[0], 1, nb, 2, 4, 2, 16)                           # (M, 1, nb, h, g, l // 16, 16)
    total = 0
    for g in range(4):
        nib = ql[:, :, :, g % 2] & 0x0F if g < 2 else ql[:, :, :, g % 2] >> 4
        q = (nib | (((qh >> (2 * g)) & 3) << 4)).float() - 32.0          # (R, nb, h, l // 16, 16)
        total = total + (xv[:, :, :, :, g] * (sc[:, :, :, g] * q)).sum((-1, -2, -3, -4))
    return total


def _kvalues(q: torch.Tensor) -> torch.Tensor:
    """IQ4 codes (uint8 in [0, 16)) -> their non-linear values (formats_iq.KVALUES), float32."""
    table = torch.tensor(KVALUES, dtype=torch.float32, device=q.device)
    return table[q.long()]


def _iq4_nl(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # block: d f16 | qs[16], nibbles as Q4_0's; w = d * KVALUES[q]
    b = data.view(data.shape[0], -1, 18)
    qs = b[..., 2:18]
    dot, _ = _halves_dot(x, _kvalues(qs & 0x0F), _kvalues(qs >> 4))
    return (_f16(b, 0)[..., 0] * dot).sum(-1)


def _iq4_xs(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # super-block: d f16 | scales_h u16 | scales_l[4] | qs[128]. Sub-block s = 2i + par of 32 reads
    # qs[16 s ...] (low nibbles, then high); its scale is (nibble par of scales_l[i]) | (bits 2s, 2s+1
    # of scales_h) << 4, minus 32; w = d * scale * KVALUES[q]
    b = data.view(data.shape[0], -1, 136)
    R, nb = b.shape[0], b.shape[1]
    sh = b[..., 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF   # (R, nb, 1)
    sl = b[..., 4:8]                                                       # (R, nb, 4)
    qs = b[..., 8:136].reshape(R, nb, 4, 2, 16)                            # (R, nb, i, par, 16)
    xv = x.view(x.shape[0], 1, nb, 4, 2, 2, 16)                            # (M, 1, nb, i, par, half, 16)
    i4 = torch.arange(4, dtype=torch.int32, device=data.device)
    d = _f16(b, 0)                                                         # (R, nb, 1)
    total = 0
    for par in (0, 1):
        nib = (sl & 0x0F) if par == 0 else (sl >> 4)
        scale = (nib.to(torch.int32) | (((sh >> (4 * i4 + 2 * par)) & 3) << 4)) - 32   # (R, nb, 4)
        q = qs[:, :, :, par]                                               # (R, nb, i, 16)
        dot = (xv[:, :, :, :, par, 0] * _kvalues(q & 0x0F) + xv[:, :, :, :, par, 1] * _kvalues(q >> 4)).sum(-1)
        total = total + (d * scale.float() * dot).sum((-1, -2))
    return total


MATVEC = {QType.Q4_0: _q4_0, QType.Q4_1: _q4_1, QType.Q5_0: _q5_0, QType.Q5_1: _q5_1, QType.Q8_0: _q8_0,
          QType.Q4_K: _q4_k, QType.Q5_K: _q5_k, QType.Q6_K: _q6_k, QType.IQ4_NL: _iq4_nl, QType.IQ4_XS: _iq4_xs}


def set_kernels(mode: str) -> None:
    """'eager' (default) or 'compiled'."""
    global _mode
    if mode not in ("eager", "compiled"):
        raise ValueError(f"kernels {mode!r}: expected eager or compiled")
    _mode = mode
    if mode == "compiled":
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)


def fused_matmul(x2: torch.Tensor, qtype, data: torch.Tensor) -> torch.Tensor | None:
    """x2 (M, n_cols) float32 @ W.T for a packed weight, or None when the fused path does not apply."""
    global _failed
    if _mode != "compiled" or x2.shape[0] > MAX_ROWS or qtype not in MATVEC:
        return None                                      # eager by design
    if _failed:
        paths.record("compiled" + paths.FALLBACK)
        return None
    fn = _compiled.get(qtype)
    if fn is None:
        fn = _compiled[qtype] = torch.compile(MATVEC[qtype], dynamic=False)
    m = x2.shape[0]
    rows = 1 << (m - 1).bit_length()                     # 1, 2, 4
    if rows != m:
        x2 = torch.cat([x2, x2.new_zeros(rows - m, x2.shape[1])])
    try:
        y = fn(x2, data)[:m]
    except Exception as e:  # noqa: BLE001 - a toolchain problem must not stop generation
        _failed = True
        paths.record("compiled" + paths.FALLBACK)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"tensorsplit: compiled kernels unavailable ({first}); using eager kernels", file=sys.stderr)
        return None
    paths.record("compiled")
    return y

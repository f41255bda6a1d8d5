"""K-quants, 256-element super-blocks: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Each decoder: blocks (n, type_size) uint8 -> (n, 256) float32. Byte layouts and the float
op order mirror gguf-py's quants.py (itself mirroring ggml), so results are bit-identical:
  Q2_K (84)   scales[16] | qs[64] | d:f16 | dmin:f16        16 sub-blocks of 16
  Q3_K (110)  hmask[32] | qs[64] | scales[12] | d:f16       16 sub-blocks of 16
  Q4_K (144)  d:f16 | dmin:f16 | scales[12] | qs[128]       8 sub-blocks of 32
  Q5_K (176)  d:f16 | dmin:f16 | scales[12] | qh[32] | qs[128]
  Q6_K (210)  ql[128] | qh[64] | scales[16] int8 | d:f16    16 sub-blocks of 16
"""
from __future__ import annotations

import torch

from ._common import bits8, crumbs, f16_field, nibbles

QK_K = 256


def scale_min_k4_halves(scales: torch.Tensor):
    """Q4_K/Q5_K packed 6-bit scales and mins: (..., 12) uint8 -> ((sc[0:4], sc[4:8]), (mn[0:4], mn[4:8])),
    each (..., 4) uint8, in halves.

    bytes 0-3: sc[0:4] low 6 bits, sc[4:8] top 2 bits (<< 4)
    bytes 4-7: mn[0:4] low 6 bits, mn[4:8] top 2 bits
    bytes 8-11: low nibble sc[4:8] low 4 bits, high nibble mn[4:8] low 4 bits
    """
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    return ((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)),
            (m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)))


def scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 12) uint8 -> sc (n, 8), mn (n, 8) uint8 (see scale_min_k4_halves)."""
    sc, mn = scale_min_k4_halves(scales)
    return torch.cat(sc, dim=-1), torch.cat(mn, dim=-1)


def dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales, qs = blocks[:, 0:16], blocks[:, 16:80]
    d, dmin = f16_field(blocks, 80), f16_field(blocks, 82)   # (n, 1)
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    # qs (n, 2, 32) -> (n, 2, 4 shifts, 32) -> 16 sub-blocks of 16
    q = crumbs(qs.reshape(n, 2, 32)).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]
    d = f16_field(blocks, 108)                               # (n, 1)
    # 16 6-bit scales: low 4 bits from nibbles of bytes 0-7, high 2 bits from bytes 8-11
    lo = nibbles(scales[:, 0:8]).reshape(n, 16)              # [low nibbles of 0-7, high nibbles of 0-7]
    hi = crumbs(scales[:, 8:12]).reshape(n, 16)              # [k*4 + j] = (byte 8+j >> 2k) & 3
    sc = (lo | (hi << 4)).to(torch.int16) - 32
    dl = (d * sc.float()).view(n, 16, 1)
    ql = crumbs(qs.reshape(n, 2, 32)).reshape(n, 16, 16)     # low 2 bits
    qh = bits8(hmask).reshape(n, 16, 16) ^ 1                 # hmask bit set -> no -4 offset
    q = ql.to(torch.int16) - (qh.to(torch.int16) << 2)
    return (dl * q.float()).reshape(n, QK_K)


def dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)     # (n, 1)
    sc, mn = scale_min_k4(blocks[:, 4:16])                   # (n, 8)
    dl = (d * sc.float()).view(n, 8, 1)
    dm = (dmin * mn.float()).view(n, 8, 1)
    # qs (n, 4, 32) -> (n, 4, 2 nibbles, 32) -> 8 sub-blocks of 32
    q = nibbles(blocks[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (dl * q - dm).reshape(n, QK_K)


def dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)
    sc, mn = scale_min_k4(blocks[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    dm = (dmin * mn.float()).view(n, 8, 1)
    ql = nibbles(blocks[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = bits8(blocks[:, 16:48])                             # (n, 8, 32): bit i -> sub-block i
    q = (ql | (qh << 4)).float()
    return (dl * q - dm).reshape(n, QK_K)


def dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 192:208].view(torch.int8).float()     # (n, 16)
    d = f16_field(blocks, 208)
    dl = (d * scales).view(n, 16, 1)
    # ql (n, 2, 64) -> (n, 2, 2 nibbles, 64) -> 8 rows of 32
    ql = nibbles(blocks[:, 0:128].reshape(n, 2, 64)).reshape(n, 8, 32)
    # qh (n, 2, 32) -> (n, 2, 4 shifts, 32) -> 8 rows of 32
    qh = crumbs(blocks[:, 128:192].reshape(n, 2, 32)).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.int16) - 32
    return (dl * q.reshape(n, 16, 16).float()).reshape(n, QK_K)

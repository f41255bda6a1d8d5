"""Non-linear 4-bit formats: IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks).

Each decoder: blocks (n, type_size) uint8 -> (n, block_size) float32, bit-identical to gguf-py:
  IQ4_NL (18)  d:f16 | qs[16]                                  x = d * KVALUES[q]
  IQ4_XS (136) d:f16 | scales_h:u16 | scales_l[4] | qs[128]    x = (d * (s - 32)) * KVALUES[q]
Nibble order as Q4_0: element j is the low nibble of qs[j], element j + 16 the high one.
"""
from __future__ import annotations

import torch

from ..layout import IQ4_LEVELS as KVALUES
from ._common import const, crumbs, f16_field, nibbles


def _lookup(q: torch.Tensor) -> torch.Tensor:
    """uint8 indices in [0, 16) of any shape -> float32 KVALUES of the same shape."""
    table = const(KVALUES, torch.float32, q.device)
    return table.index_select(0, q.reshape(-1).to(torch.int32)).view(q.shape)


def dequant_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    d = f16_field(blocks, 0)                                 # (n, 1)
    q = nibbles(blocks[:, 2:18]).flatten(-2)                 # (n, 32)
    return d * _lookup(q)


def dequant_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = f16_field(blocks, 0)
    # 8 6-bit scales: low 4 bits = nibbles of scales_l in byte order (low first),
    # high 2 bits = bits 2i..2i+1 of the little-endian uint16 scales_h
    lo = nibbles(blocks[:, 4:8]).transpose(-1, -2).reshape(n, 8)
    hi = crumbs(blocks[:, 2:4]).transpose(-1, -2).reshape(n, 8)
    sc = (lo | (hi << 4)).to(torch.int16) - 32
    dl = (d * sc.float()).view(n, 8, 1)
    q = nibbles(blocks[:, 8:136].reshape(n, 8, 16)).reshape(n, 8, 32)
    return (dl * _lookup(q)).reshape(n, 256)

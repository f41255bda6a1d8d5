"""Legacy 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each decoder: blocks (n, type_size) uint8 -> (n, 32) float32. Layouts (bytes) and float op
order follow gguf-py's quants.py so results are bit-identical:
  Q4_0  d:f16 | qs[16]                 x = d * (q - 8)
  Q4_1  d:f16 | m:f16 | qs[16]         x = d * q + m
  Q5_0  d:f16 | qh[4] | qs[16]         x = d * (q - 16), q = nibble | bit << 4
  Q5_1  d:f16 | m:f16 | qh[4] | qs[16] x = d * q + m
  Q8_0  d:f16 | qs[32] int8            x = q * d
Nibbles: element j is the low nibble of qs[j], element j + 16 the high nibble.
qh is a little-endian uint32 whose bit i is the 5th bit of element i.
"""
from __future__ import annotations

import torch

from ._common import bits8, f16_field, nibbles


def _q4(qs: torch.Tensor) -> torch.Tensor:
    # (n, 16) uint8 -> (n, 32) uint8 in [0, 16)
    return nibbles(qs).flatten(-2)


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # qh (n, 4), qs (n, 16) uint8 -> (n, 32) uint8 in [0, 32)
    hi = bits8(qh).transpose(-1, -2).flatten(-2)  # (n, 4 bytes, 8 bits) -> bit i at index i
    return _q4(qs) | (hi << 4)


def dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = f16_field(blocks, 0)                                 # (n, 1)
    q = _q4(blocks[:, 2:18]).to(torch.int16) - 8             # (n, 32)
    return d * q.float()


def dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = f16_field(blocks, 0), f16_field(blocks, 2)        # (n, 1) each
    q = _q4(blocks[:, 4:20]).float()                         # (n, 32)
    return d * q + m


def dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = f16_field(blocks, 0)
    q = _q5(blocks[:, 2:6], blocks[:, 6:22]).to(torch.int16) - 16
    return d * q.float()


def dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = f16_field(blocks, 0), f16_field(blocks, 2)
    q = _q5(blocks[:, 4:8], blocks[:, 8:24]).float()
    return d * q + m


def dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = f16_field(blocks, 0)
    q = blocks[:, 2:34].view(torch.int8).float()             # (n, 32)
    return q * d

"""Microscaling 4-bit floats: MXFP4 (OCP MX v1.0; gpt-oss's experts), 32-element blocks.

  MXFP4 (17)  e:u8 | qs[16]      x = E2M1[q] * 2^(e - 127), written here as (2 * E2M1[q]) * 2^(e - 128)

e is an E8M0 scale: a bare exponent, no sign, no mantissa. The 16 E2M1 codes are 0, 0.5, 1, 1.5, 2, 3, 4, 6
and their negatives. They are kept doubled as small integers, as ggml's kvalues_mxfp4 keeps them, with
the halving folded into the scale. Nibble order as Q4_0: element j is the low nibble of qs[j], element
j + 16 the high one. Bit-identical to gguf-py: every product of a code and a power of two is exact in
float32 (2^-128 is a subnormal float32, still exact).
"""
from __future__ import annotations

import torch

from ._common import const, nibbles

E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def dequant_mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    e = blocks[:, :1].to(torch.int32)
    scale = torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=blocks.device), e - 128)   # (n, 1): 2^(e - 128)
    q = nibbles(blocks[:, 1:17]).flatten(-2)                            # (n, 32)
    table = const(E2M1_DOUBLED, torch.float32, blocks.device)
    return table.index_select(0, q.reshape(-1).to(torch.int32)).view(q.shape) * scale

"""F32 / F16 / BF16 decoders over raw little-endian bytes.

Each takes blocks (n, type_size) uint8 (block_size is 1) and returns (n, 1) float32.
Dense float tensors (not bytes) are handled directly in dequant.dequantize.
"""
from __future__ import annotations

import torch

from ._common import bytes_as


def dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    # (n, 4) uint8 -> (n, 1) float32
    return bytes_as(blocks, torch.float32)


def dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    # (n, 2) uint8 -> (n, 1) float32
    return bytes_as(blocks, torch.float16).float()


def dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # (n, 2) uint8 -> (n, 1) float32; bf16 is the top half of an fp32, exact
    return bytes_as(blocks, torch.bfloat16).float()

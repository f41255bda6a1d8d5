"""The single dispatch table from quant type to block decoder, and `dequantize` over rows.

A decoder maps blocks (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 on the
blocks' own device. Adding a format = one function in a formats_* module + one entry here.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import formats_float as ff
from . import formats_iq as fi
from . import formats_k as fk
from . import formats_legacy as fl
from . import formats_mx as fm
from .qtypes import FLOAT_TYPES, QType, block_info, check_supported, type_name

BlockDecoder = Callable[[torch.Tensor], torch.Tensor]

DEQUANTIZERS: dict[QType, BlockDecoder] = {
    QType.F32: ff.dequant_f32,
    QType.F16: ff.dequant_f16,
    QType.BF16: ff.dequant_bf16,
    QType.Q4_0: fl.dequant_q4_0,
    QType.Q4_1: fl.dequant_q4_1,
    QType.Q5_0: fl.dequant_q5_0,
    QType.Q5_1: fl.dequant_q5_1,
    QType.Q8_0: fl.dequant_q8_0,
    QType.Q2_K: fk.dequant_q2_k,
    QType.Q3_K: fk.dequant_q3_k,
    QType.Q4_K: fk.dequant_q4_k,
    QType.Q5_K: fk.dequant_q5_k,
    QType.Q6_K: fk.dequant_q6_k,
    QType.IQ4_NL: fi.dequant_iq4_nl,
    QType.IQ4_XS: fi.dequant_iq4_xs,
    QType.MXFP4: fm.dequant_mxfp4,
}


def dequantize(raw: torch.Tensor, qtype, n_cols: int, name: str = "") -> torch.Tensor:
    """GGUF rows -> float32 (n_rows, n_cols) on raw's device.

    raw: uint8 (n_rows, row_bytes(qtype, n_cols)) holding blocks row by row; for F32/F16/BF16
    it may instead be a float tensor (n_rows, n_cols) (an F32 tensor is returned as is, shared).
    """
    qt = check_supported(qtype, name)
    if raw.dtype != torch.uint8:
        assert qt in FLOAT_TYPES and raw.dtype.is_floating_point, (
            f"{name}: {type_name(qt)} data must be uint8 bytes, got {raw.dtype}")
        assert raw.shape[-1] == n_cols, f"{name}: expected {n_cols} columns, got {tuple(raw.shape)}"
        return raw.to(torch.float32)
    bs, ts = block_info(qt)
    assert n_cols % bs == 0 and raw.shape[-1] == n_cols // bs * ts, (
        f"{name}: {type_name(qt)} rows of {n_cols} columns need {n_cols // bs * ts} bytes, "
        f"got shape {tuple(raw.shape)}")
    n_rows = raw.shape[0]
    blocks = raw.reshape(n_rows * (n_cols // bs), ts)        # (n_blocks, type_size)
    return DEQUANTIZERS[qt](blocks).reshape(n_rows, n_cols)

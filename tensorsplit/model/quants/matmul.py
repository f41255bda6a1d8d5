"""qmatmul (y = x @ W.T over quantized W, tile by tile) and get_rows (embedding lookup).

qmatmul is THE single entry point for quantized matmuls: a faster fused kernel slots in
here, keyed on w.qtype / device, without touching callers.
"""
from __future__ import annotations

import torch

from . import paths
from .activations import round_inputs
from .dequant import dequantize
from .fused import fused_matmul
from .qweight import QWeight

# Most weight elements dequantized at once by qmatmul (one tile of whole rows): 4M float32
# = 16 MiB of scratch. Tests shrink it with monkeypatch to exercise multi-tile paths.
TILE_ELEMS = 1 << 22


def qmatmul(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """y = x @ W.T: x (..., n_cols) -> (..., n_rows) float32, on x's / w.data's device.

    Dequantizes at most TILE_ELEMS weight elements (whole rows) at a time and never
    materializes the full dense matrix when it is larger than one tile.
    """
    if x.shape[-1] != w.n_cols:
        raise ValueError(f"{w.name}: input has {x.shape[-1]} features, weight expects {w.n_cols}")
    lead = x.shape[:-1]
    # (M, n_cols); rounded only under --numerics llamacpp
    x2 = round_inputs(x.reshape(-1, w.n_cols).to(torch.float32), w.qtype)
    if w.data.dtype == torch.float32:                        # dense F32: no tiling needed
        return (x2 @ w.data.T).reshape(*lead, w.n_rows)
    fused = fused_matmul(x2, w.qtype, w.data)                # decode steps, when compiled kernels are on
    if fused is not None:
        return fused.reshape(*lead, w.n_rows)
    paths.record("eager")
    out = torch.empty(x2.shape[0], w.n_rows, dtype=torch.float32, device=x2.device)  # (M, n_rows)
    step = max(1, TILE_ELEMS // max(1, w.n_cols))            # rows per tile
    for r0 in range(0, w.n_rows, step):
        r1 = min(r0 + step, w.n_rows)
        tile = dequantize(w.data[r0:r1], w.qtype, w.n_cols, w.name)  # (r1 - r0, n_cols)
        out[:, r0:r1] = x2 @ tile.T
    return out.reshape(*lead, w.n_rows)


def get_rows(w: QWeight, ids: torch.Tensor) -> torch.Tensor:
    """Dequantize only rows `ids` of w: ids (k,) -> (k, n_cols) float32 (any ids shape -> (*ids.shape, n_cols))."""
    flat = ids.reshape(-1).to(device=w.data.device, dtype=torch.long)
    rows = dequantize(w.data.index_select(0, flat), w.qtype, w.n_cols, w.name)
    return rows.reshape(*ids.shape, w.n_cols)

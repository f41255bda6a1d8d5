"""QWeight: a 2-D weight kept in GGUF block layout, plus loading from numpy bytes and
column slicing on block boundaries (for tensor-parallel sharding of input features)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import ConfigError, ShardPlanError
from ..layout import ACT_KINDS, FORMATS, n_tiles
from .qtypes import FLOAT_TYPES, QType, block_info, check_supported, row_bytes, type_name

# dense dtype kept for each float type
FLOAT_DTYPES = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}
# numpy dtype to reinterpret file bytes as (numpy has no bfloat16: int16 then torch view)
_NP_VIEW = {QType.F32: np.float32, QType.F16: np.float16, QType.BF16: np.int16}


@dataclass(frozen=True)
class TileKernel:
    """A tiled weight's arguments to the native kernels, worked out once: the GGML type id, the
    activation quantization kind of its integer kernel (None: a float kernel), its scale group, and
    whether it has a min term (the exact path then needs per-group sums of x)."""
    type_id: int
    act: int | None
    group: int
    has_min: bool


@dataclass
class QWeight:
    """A 2-D weight kept in GGUF block layout. shape = (n_rows, n_cols) in torch order:
    n_rows = out features (ggml ne[1]), n_cols = in features (ggml ne[0]).

    layout "gguf":   data is uint8 (n_rows, row_bytes) GGUF blocks for quantized types, or
                     float32/float16/bfloat16 (n_rows, n_cols) for F32/F16/BF16;
    layout "tiles":  data is uint8 (ceil(n_rows / 16), tile_bytes), the same blocks with 16 rows
                     interleaved for the native kernels (kernels/csrc/layout.h); see to_tiles().
    """
    data: torch.Tensor
    qtype: QType
    n_rows: int
    n_cols: int
    name: str = ""
    layout: str = "gguf"
    kernel: "TileKernel | None" = None       # how the native kernels multiply it (tiled layout only)

    def __post_init__(self):
        self.qtype = check_supported(self.qtype, self.name)
        bs, _ = block_info(self.qtype)
        if self.n_cols % bs:
            raise ConfigError(f"{self.name}: {self.n_cols} columns is not a multiple of the "
                              f"{self.qtype.name} block size {bs}")
        if self.layout == "tiles":
            f = FORMATS[int(self.qtype)]
            want = (n_tiles(self.n_rows), self.n_cols // f.block * f.tile_block)
            assert self.data.dtype == torch.uint8, f"{self.name}: expected uint8 tiles, got {self.data.dtype}"
            self.kernel = TileKernel(int(self.qtype), ACT_KINDS.get(f.act), f.group, f.has_min)
        elif self.qtype in FLOAT_TYPES and self.data.dtype != torch.uint8:
            want = (self.n_rows, self.n_cols)
        else:
            want = (self.n_rows, row_bytes(self.qtype, self.n_cols))
            assert self.data.dtype == torch.uint8, f"{self.name}: expected uint8 blocks, got {self.data.dtype}"
        assert tuple(self.data.shape) == want, f"{self.name}: data shape {tuple(self.data.shape)} != {want}"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    @property
    def nbytes(self) -> int:
        """Bytes held by data."""
        return self.data.numel() * self.data.element_size()

    def to(self, device) -> "QWeight":
        return QWeight(self.data.to(device), self.qtype, self.n_rows, self.n_cols, self.name, self.layout)


    def to_tiles(self) -> "QWeight":
        """The same weight in the native kernels' tiled layout (CPU; needs kernels.native()). Same bytes
        but for whole-tile padding of the rows and, for Q3_K/Q4_K/Q5_K/IQ4_XS, scales widened to bytes."""
        assert self.layout == "gguf" and self.data.device.type == "cpu", (self.name, self.layout, self.data.device)
        raw = self.data if self.data.dtype == torch.uint8 else self.data.view(torch.uint8)
        tiles = torch.ops.tensorsplit.repack(raw.reshape(self.n_rows, -1).contiguous(), int(self.qtype), self.n_cols)
        return QWeight(tiles, self.qtype, self.n_rows, self.n_cols, self.name, "tiles")

    @staticmethod
    def from_numpy(raw: np.ndarray, qtype, n_rows: int, n_cols: int, name: str = "") -> "QWeight":
        """Copy file bytes (possibly a non-contiguous memmap view) into a QWeight.

        raw: uint8 (n_rows, row_bytes) bytes; for F32/F16/BF16 it may be uint8 bytes
        (reinterpreted) or an already-typed float32/float16 array (n_rows, n_cols).
        """
        qt = check_supported(qtype, name)
        bs, _ = block_info(qt)
        if n_cols % bs:
            raise ConfigError(f"{name}: {n_cols} columns is not a multiple of the {qt.name} block size {bs}")
        nbytes = n_rows * row_bytes(qt, n_cols)
        if raw.nbytes != nbytes:
            raise ConfigError(f"{name}: {qt.name} tensor of {n_rows}x{n_cols} needs {nbytes} bytes, "
                              f"got {raw.nbytes}")
        arr = np.array(raw, copy=True, order="C")            # own, writable, contiguous
        if qt in FLOAT_TYPES:
            # (n_rows, n_cols) typed view of the bytes
            arr = arr.view(np.uint8).reshape(-1).view(_NP_VIEW[qt]).reshape(n_rows, n_cols)
            t = torch.from_numpy(arr)
            if qt == QType.BF16:
                t = t.view(torch.bfloat16)
        else:
            t = torch.from_numpy(arr.view(np.uint8).reshape(n_rows, -1))
        return QWeight(t, qt, n_rows, n_cols, name)


def slice_cols(w: QWeight, start: int, end: int) -> QWeight:
    """Keep input columns [start, end) of w; both must lie on block boundaries.

    Raises ShardPlanError naming the tensor, type, block size and offending column otherwise.
    The result owns a contiguous copy of its bytes.
    """
    assert w.layout == "gguf", f"{w.name}: slice columns before tiling"
    bs, ts = block_info(w.qtype)
    if not 0 <= start < end <= w.n_cols:
        raise ShardPlanError(f"{w.name}: column range [{start}, {end}) is empty or outside "
                             f"[0, {w.n_cols})")
    for col in (start, end):
        if col % bs:
            raise ShardPlanError(
                f"{w.name}: cannot split {type_name(w.qtype)} tensor at column {col}: "
                f"not a multiple of its block size {bs}")
    if w.data.dtype == torch.uint8:
        data = w.data[:, start // bs * ts:end // bs * ts]    # (n_rows, bytes of [start, end))
    else:
        data = w.data[:, start:end]                          # dense float (n_rows, end - start)
    return QWeight(data.contiguous(), w.qtype, w.n_rows, end - start, w.name)

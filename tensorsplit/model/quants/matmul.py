"""qmatmul (y = x @ W.T over a quantized W) and get_rows (embedding lookup): the single entry point
for matmuls against GGUF weights, on either layout of QWeight.

  native layout (the default on a CPU, kernels/): one op per matmul, straight from the blocks.
    numerics llamacpp: the input is quantized to 8 bits once (MatmulInput caches it, so q/k/v
    and gate/up share it) and multiplied in integers; exact: float input, weights decoded in
    registers.
  GGUF layout on a CUDA / ROCm GPU (kernels/gpu/): Triton kernels decode the blocks in registers;
    a gemv for decode steps, a gemm for prompt chunks. In llamacpp numerics the input is first
    rounded as llama.cpp's CPU backend rounds it, so GPU and CPU ranks see the same inputs.
  GGUF layout elsewhere (no native kernels, mps, xpu, float weights on a GPU): dequantize a bounded
    tile of rows at a time to float32 and multiply, the input rounded as above.
"""
from __future__ import annotations

import torch

from ...kernels import gpu
from ...kernels.ops import ops
from ..numerics import Numerics
from . import paths
from .activations import ROUNDING_KIND, round_inputs
from .dequant import dequantize
from .qtypes import QType
from .qweight import QWeight

# Most weight elements dequantized at once on the torch path (one tile of whole rows): 4M float32
# = 16 MiB of scratch. Tests shrink it with monkeypatch to exercise multi-tile paths.
TILE_ELEMS = 1 << 22


class MatmulInput:
    """A matmul input x (..., K) that several weights multiply (q, k, v; gate, up): each form a weight
    needs (8-bit blocks of a kind, per-group sums, a rounded copy) is computed once and kept."""
    __slots__ = ("lead", "n_cols", "numerics", "x2", "_forms")

    def __init__(self, x: torch.Tensor, numerics: Numerics):
        self.lead, self.n_cols, self.numerics = x.shape[:-1], x.shape[-1], numerics
        self.x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()     # (M, K)
        self._forms: dict = {}

    def q8(self, kind: int, group: int):
        """(q int8 (M, K), d, s, isum (M, K / group)): llama.cpp's Q8_0 / Q8_1 / Q8_K of x."""
        key = (kind, group)
        form = self._forms.get(key)
        if form is None:
            form = self._forms[key] = ops.quantize_act(self.x2, kind, group)
        return form

    def sums(self, group: int) -> torch.Tensor:
        """Per-group sums of x (M, K / group), for the min term of the exact path."""
        key = ("sums", group)
        form = self._forms.get(key)
        if form is None:
            form = self._forms[key] = ops.group_sums(self.x2, group)
        return form

    def rounded(self, qtype) -> torch.Tensor:
        """x as a llamacpp-numerics matmul against qtype sees it (torch path and float weights)."""
        if not self.numerics.llamacpp or qtype == QType.F32:
            return self.x2
        key = ("rounded", ROUNDING_KIND[qtype])
        form = self._forms.get(key)
        if form is None:
            form = self._forms[key] = round_inputs(self.x2, qtype)
        return form


def qmatmul(x: torch.Tensor | MatmulInput, w: QWeight, numerics: Numerics | None = None,
            wide: bool = False) -> torch.Tensor:
    """y = x @ W.T: x (..., n_cols) -> (..., n_rows) float32, on x's / w.data's device.

    wide: accumulate and return float64 (native kernels; the torch path returns its float32 result as
    float64). A row-parallel partial sum is kept wide through the all-reduce and rounded once after."""
    inp = x if isinstance(x, MatmulInput) else MatmulInput(x, numerics or Numerics())
    if inp.n_cols != w.n_cols:
        raise ValueError(f"{w.name}: input has {inp.n_cols} features, weight expects {w.n_cols}")
    k = w.kernel
    if k is not None:                                           # native layout
        paths.record("native")
        if k.act is None:                                       # F16 / BF16: float arithmetic
            y = ops.matmul_f32(w.data, k.type_id, w.n_rows, w.n_cols, inp.rounded(w.qtype), None, wide)
        elif inp.numerics.llamacpp:
            q, d, s, isum = inp.q8(k.act, k.group)
            y = ops.matmul_q8(w.data, k.type_id, w.n_rows, w.n_cols, q, d, s, isum, wide)
        else:
            y = ops.matmul_f32(w.data, k.type_id, w.n_rows, w.n_cols, inp.x2,
                               inp.sums(k.group) if k.has_min else None, wide)
    elif gpu.serves(w):                                         # GGUF blocks on a GPU: Triton
        paths.record("triton")
        y = gpu.qmatmul(inp.rounded(w.qtype).contiguous(), w, fp16_gemm=inp.numerics.llamacpp)
        y = y.double() if wide else y
    elif w.data.dtype == torch.float32:                         # dense F32: ggml multiplies in float32 too
        y = inp.x2.double() @ w.data.double().T if wide else inp.x2 @ w.data.T
    else:
        paths.record(paths.torch_path(w.data.device))
        y = _tiled(inp.rounded(w.qtype), w, wide)
    return y if len(inp.lead) == 1 else y.reshape(*inp.lead, w.n_rows)


def _tiled(x2: torch.Tensor, w: QWeight, wide: bool = False) -> torch.Tensor:
    """Dequantize at most TILE_ELEMS weight elements (whole rows) at a time; never the whole matrix
    when it is larger than one tile. wide: the products summed in float64 (row-parallel partials)."""
    dtype = torch.float64 if wide else torch.float32
    out = torch.empty(x2.shape[0], w.n_rows, dtype=dtype, device=x2.device)  # (M, n_rows)
    x2 = x2.to(dtype)
    step = max(1, TILE_ELEMS // max(1, w.n_cols))            # rows per tile
    for r0 in range(0, w.n_rows, step):
        r1 = min(r0 + step, w.n_rows)
        tile = dequantize(w.data[r0:r1], w.qtype, w.n_cols, w.name)  # (r1 - r0, n_cols)
        out[:, r0:r1] = x2 @ tile.to(dtype).T
    return out


def get_rows(w: QWeight, ids: torch.Tensor) -> torch.Tensor:
    """Dequantize only rows `ids` of w: ids (k,) -> (k, n_cols) float32 (any ids shape -> (*ids.shape, n_cols))."""
    flat = ids.reshape(-1).to(device=w.data.device, dtype=torch.long)
    if w.layout == "native":
        raw = ops.unpack_rows(w.data, int(w.qtype), w.n_rows, w.n_cols, flat)  # GGUF bytes
    else:
        raw = w.data.index_select(0, flat)
    rows = dequantize(raw, w.qtype, w.n_cols, w.name)
    return rows.reshape(*ids.shape, w.n_cols)

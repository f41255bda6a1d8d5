"""Quantized matmul on GPUs, in Triton, straight from the GGUF blocks (decode.py: the formats;
matmul.py: the gemv for decode steps and the gemm for prompt chunks). One source serves CUDA and
ROCm (torch's "cuda" device on a HIP build); other accelerators (mps, xpu) take the portable torch
path, and so does a CUDA machine without Triton (one warning line; the matmuls then count as
"triton:fallback", kernels/counting.py).

    gpu.handles(w)     -> whether the kernels have a format for a QWeight (GGUF-layout blocks)
    gpu.available()    -> Triton imports and these kernels load (TENSORSPLIT_TRITON=0: off)
A CUDA rank's TritonKernels (../triton_kernels.py) send the weights they handle here.

On a machine without a GPU the same kernels run under Triton's interpreter (TRITON_INTERPRET=1,
set before the first import), which is how the CPU test suite checks them against gguf-py.
Triton is imported only when a GPU weight first needs it.
"""
from __future__ import annotations

import os

from ..layout import FORMATS
from ...messages import say

_state: dict = {}


def available() -> bool:
    if "ok" not in _state:
        if os.environ.get("TENSORSPLIT_TRITON", "1") == "0":
            _state["ok"] = False
        else:
            try:
                from . import matmul  # noqa: F401 - imports triton and defines the kernels
                _state["ok"] = True
            except ImportError as e:
                say(f"Triton kernels unavailable ({e}); GPU matmuls use the slower torch path")
                _state["ok"] = False
    return _state["ok"]


def unavailable() -> bool:
    """The Triton kernels were wanted (not turned off by TENSORSPLIT_TRITON=0) but could not load."""
    return _state.get("ok") is False and os.environ.get("TENSORSPLIT_TRITON", "1") != "0"


def handles(w) -> bool:
    """A weight the kernels have a format for: GGUF-layout quantized blocks (float weights go to the BLAS)."""
    f = FORMATS.get(int(w.qtype))
    return w.layout == "gguf" and f is not None and f.act is not None and w.data.dtype.itemsize == 1


def qmatmul(x2, w, fp16_gemm: bool):
    """x2 (M, K) float32 @ w.T -> (M, n_rows) float32 (matmul.qmatmul for a QWeight)."""
    from .matmul import qmatmul as run
    return run(x2, w.data, int(w.qtype), w.n_rows, w.n_cols, fp16_gemm)


__all__ = ["available", "unavailable", "handles", "qmatmul"]

"""TritonKernels: the Kernels (base.py) of a CUDA or ROCm rank. Matmuls over GGUF block weights run on
the Triton kernels of gpu/ (a gemv for decode steps, a gemm for prompt chunks), decoding the blocks in
registers; their input is rounded as llama.cpp's CPU backend rounds it under llamacpp numerics, so GPU
and CPU ranks see the same inputs, and the gemm multiplies in fp16 there (float32 in exact numerics).
Everything else (float weights, embedding rows, norms, rope, attention) is the reference's.
"""
from __future__ import annotations

import torch

from . import gpu
from .base import MatmulInput
from .numerics import Numerics
from .quants.qweight import QWeight
from .torch_kernels import TorchKernels


class TritonKernels(TorchKernels):
    name = "triton"

    def __init__(self, numerics: Numerics, device="cuda"):
        """device: "cuda" on a GPU; tests pass "cpu" to run the same kernels under Triton's interpreter."""
        super().__init__(numerics, device)
        self._fp16_gemm = numerics.llamacpp

    def path(self, w: QWeight) -> str | None:
        return self.name if gpu.handles(w) else super().path(w)

    def matmul(self, x, w: QWeight, wide: bool = False) -> torch.Tensor:
        if not gpu.handles(w):
            return super().matmul(x, w, wide)
        inp = MatmulInput.of(x)
        inp.check(w)
        y = gpu.qmatmul(self.rounded(inp, w.qtype).contiguous(), w, self._fp16_gemm)
        return inp.shaped(y.double() if wide else y)

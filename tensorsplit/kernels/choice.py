"""The one place a rank's kernels are chosen (base.py: what each set is), for its device and the
world's numerics:

    a CPU, the native kernels wanted and loaded   -> NativeKernels
    a CUDA / ROCm GPU with Triton                 -> TritonKernels
    anything else                                 -> TorchKernels; where the faster set was wanted
                                                     but could not load, its matmuls count as
                                                     "native:fallback" / "triton:fallback"

`native` is the world plan's answer (plan/world.py): whether CPU ranks hold the tiled layout.
"""
from __future__ import annotations

import torch

from . import gpu, native as native_loaded, unavailable as native_unavailable
from .base import Kernels
from .numerics import Numerics
from .torch_kernels import TorchKernels


def choose_kernels(device, numerics: Numerics, native: bool = True) -> Kernels:
    device = torch.device(device)
    if device.type == "cpu":
        if native and native_loaded():
            from .native_kernels import NativeKernels
            return NativeKernels(numerics)
        return TorchKernels(numerics, device, "native:fallback" if native and native_unavailable() else "torch")
    if device.type == "cuda":
        if gpu.available():
            from .triton_kernels import TritonKernels
            return TritonKernels(numerics, device)
        return TorchKernels(numerics, device, "triton:fallback" if gpu.unavailable() else "torch")
    return TorchKernels(numerics, device)

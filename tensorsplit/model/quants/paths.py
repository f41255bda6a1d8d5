"""Which path each quantized matmul took, counted: the evidence that the native kernels really ran.

When the native kernels cannot run (no compiler, a failed build, a library that does not load),
weights stay in GGUF layout and the torch path computes the matmuls (dequantize a tile and
multiply), whose results agree with the kernels' to float32 rounding: a test that compares
numbers cannot tell the two apart. So every quantized matmul records here what computed it:

  "native"            the native kernels (tensorsplit/kernels)
  "torch"             the torch path, where no native kernel was asked for (TENSORSPLIT_NATIVE=0,
                      a GPU, a weight a test built in GGUF layout)
  "native:fallback"   the native kernels were asked for on a CPU but could not load; torch did it
  "triton"            the Triton kernels, for block weights on a CUDA / ROCm GPU (kernels/gpu/)
  "triton:fallback"   a block weight on such a GPU, but Triton could not load; torch did it

Tests read `counts()` (in-process) or the per-rank files a worker writes when
TENSORSPLIT_KERNEL_PATHS names a folder (worker/main.py), and fail on any ":fallback".
One dictionary update per matmul; counts are per process.
"""
from __future__ import annotations

from collections import Counter

FALLBACK = ":fallback"
_counts: Counter = Counter()


def record(path: str) -> None:
    _counts[path] += 1


def counts() -> dict[str, int]:
    """A copy of the counts since the process started (or the last reset)."""
    return dict(_counts)


def reset() -> None:
    _counts.clear()


def torch_path(device) -> str:
    """What a torch-path matmul on `device` counts as: a fallback when native kernels were wanted there."""
    from ...kernels import gpu, unavailable
    if device.type == "cpu" and unavailable():
        return "native:fallback"
    if device.type == "cuda" and gpu.unavailable():
        return "triton:fallback"
    return "torch"


def fallbacks(c: dict[str, int]) -> dict[str, int]:
    """The fallback entries of a counts dictionary."""
    return {k: v for k, v in c.items() if k.endswith(FALLBACK)}

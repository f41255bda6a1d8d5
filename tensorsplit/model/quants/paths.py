"""Which path each quantized matmul took, counted: the evidence that a fast kernel really ran.

A fast kernel that cannot run (no compiler, a toolchain error, later a native library that does
not load) falls back to the eager path, dequantize a tile and multiply, whose results agree with
the kernel's to float32 rounding: a test that compares numbers cannot tell the two apart. So
every quantized matmul records here what computed it:

  "eager"             the eager path (dequantize + BLAS): no fast kernel was asked for, or none
                      applies by design (a step with too many rows, a format without a kernel)
  "<kernel>"          the fast kernel named so computed it ("compiled": fused.py)
  "<kernel>:fallback" that kernel was asked for and applies, but could not run; "eager" did it

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


def fallbacks(c: dict[str, int]) -> dict[str, int]:
    """The fallback entries of a counts dictionary."""
    return {k: v for k, v in c.items() if k.endswith(FALLBACK)}

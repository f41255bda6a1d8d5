"""Which kernels computed each quantized matmul, counted: the evidence that the fast kernels really ran.

When the native kernels cannot run (no compiler, a failed build, a library that does not load),
weights stay in GGUF layout and the reference computes the matmuls, whose results agree with the
kernels' to float32 rounding: a test that compares numbers cannot tell the two apart. So tests wrap a
rank's kernels in `Counting`, which counts per matmul what its kernels say computed it (path()):

  "native"            the native kernels (native_kernels.py)
  "triton"            the Triton kernels, for block weights on a CUDA / ROCm GPU (triton_kernels.py)
  "torch"             the reference, where no faster kernel was asked for (TENSORSPLIT_NATIVE=0, a GPU
                      without Triton on purpose, a weight a test built in GGUF layout)
  "native:fallback"   the native kernels were asked for on a CPU but could not load; torch did it
  "triton:fallback"   a GPU whose Triton could not load; torch did it

A worker wraps its kernels so when TENSORSPLIT_KERNEL_PATHS names a folder (the suite sets it), and
writes its counts there (worker/main.py); nothing counts otherwise.
"""
from __future__ import annotations

from collections import Counter

FALLBACK = ":fallback"


class Counting:
    """The kernels `inner`, counting their matmuls by path in `counts`."""

    def __init__(self, inner):
        self.inner = inner
        self.counts: Counter = Counter()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def matmul(self, x, w, wide: bool = False):
        path = self.inner.path(w)
        if path is not None:
            self.counts[path] += 1
        return self.inner.matmul(x, w, wide)


def fallbacks(c: dict[str, int]) -> dict[str, int]:
    """The fallback entries of a counts dictionary."""
    return {k: v for k, v in c.items() if k.endswith(FALLBACK)}

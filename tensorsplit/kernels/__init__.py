"""What a rank computes with. base.py: the Kernels protocol the model calls (matmul, get_rows,
rms_norm, rope, attend), with three implementations, one chosen per rank in choice.py:
torch_kernels.py (the reference, any device), native_kernels.py (C++ on a CPU), triton_kernels.py
(Triton on CUDA / ROCm). quants/: GGUF block formats and QWeight; numerics.py: the two arithmetics;
counting.py: which kernels ran, for tests.

The native CPU kernels are C++ in csrc/, built on first use with torch.utils.cpp_extension
(build.py) and registered as torch custom ops (`torch.ops.tensorsplit.*`, with fake implementations
so torch.compile can trace them). Instruction sets are chosen at run time: AVX-512 VNNI, AVX2, or
portable scalar code.

    kernels.native()    -> True when the ops are loaded (building them the first time)
    kernels.isa()       -> "avx512-vnni", "avx2" or "scalar"

With no compiler (or a failed build) one warning line is printed and CPU ranks use the reference
kernels. TENSORSPLIT_NATIVE=0 turns the native kernels off (for debugging and tests).
Each kernel has a reference it is tested against: gguf-py's numpy dequantization followed by a
float64 matmul, and a numpy transcription of llama.cpp's activation quantization (tests/).
"""
from __future__ import annotations

import os

from .build import BuildError, load_library
from ..messages import say

_state: dict = {}


def native(announce: bool = True) -> bool:
    """Whether the native kernels are usable in this process; builds and loads them once."""
    if "ok" in _state:
        return _state["ok"]
    if os.environ.get("TENSORSPLIT_NATIVE", "1") == "0":
        _state["ok"] = False
        return False
    try:
        load_library(announce=announce)
        from . import fake  # noqa: F401 - registers the fake (meta) implementations
        _state["ok"] = True
    except (BuildError, OSError, RuntimeError) as e:
        say(f"native kernels unavailable ({e}); using the slower torch path")
        _state["ok"] = False
    return _state["ok"]


def unavailable() -> bool:
    """The native kernels were wanted (not turned off by TENSORSPLIT_NATIVE=0) but could not load."""
    return _state.get("ok") is False and os.environ.get("TENSORSPLIT_NATIVE", "1") != "0"


def isa() -> str:
    """The instruction set the native kernels run with, or "torch" when they are unavailable."""
    if not native():
        return "torch"
    import torch
    return torch.ops.tensorsplit.isa()


__all__ = ["native", "unavailable", "isa", "BuildError"]

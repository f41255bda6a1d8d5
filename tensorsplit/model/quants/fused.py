"""Fused dequantize-and-multiply for decode steps, compiled by torch.compile (opt-in).

A decode step multiplies a few rows of activations by every weight. The eager path
dequantizes each weight tile to float32 and calls the BLAS: for one row that is several
passes over memory per weight element. Here each format's block decode and the dot product
are written as one expression, (x * dequant(W)).sum(), which inductor compiles into a single
loop that reads the packed blocks once (on the CPU, C++; on a GPU, Triton).

Enabled with `set_kernels("compiled")` (`--kernels compiled`); used for steps of at most
MAX_ROWS rows and the formats in MATVEC. Shapes are static: each distinct (format, weight
shape) compiles once per process (seconds; inductor caches the code on disk across runs).
If compilation fails (no C++ compiler, say), a warning is printed once and the eager path
is used from then on.
"""
from __future__ import annotations

import sys

import torch

from .qtypes import QType

MAX_ROWS = 4          # steps with more rows (prompt chunks, big batches) go to dequantize + BLAS
_mode = "eager"
_compiled: dict = {}
_failed = False


def _f16(b: torch.Tensor, lo: int) -> torch.Tensor:
    """(R, nb, type_size) uint8 -> the float16 field at byte lo as float32 (R, nb, 1)."""
    return b[..., lo:lo + 2].contiguous().view(torch.float16).float()


def _q4_0(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # block: d f16 | qs[16]; element j = low nibble of qs[j], j + 16 = high nibble; w = d * (q - 8)
    b = data.view(data.shape[0], -1, 18)
    qs = b[..., 2:18]
    q = torch.cat([(qs & 0x0F).float(), (qs >> 4).float()], -1) - 8.0
    return (x.view(x.shape[0], 1, -1, 32) * (_f16(b, 0) * q).unsqueeze(0)).sum((-1, -2))


def _q4_1(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # block: d f16 | m f16 | qs[16]; w = d * q + m
    b = data.view(data.shape[0], -1, 20)
    qs = b[..., 4:20]
    q = torch.cat([(qs & 0x0F).float(), (qs >> 4).float()], -1)
    return (x.view(x.shape[0], 1, -1, 32) * (_f16(b, 0) * q + _f16(b, 2)).unsqueeze(0)).sum((-1, -2))


def _q8_0(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # block: d f16 | qs[32] int8; w = q * d
    b = data.view(data.shape[0], -1, 34)
    q = b[..., 2:34].contiguous().view(torch.int8).float()
    return (x.view(x.shape[0], 1, -1, 32) * (q * _f16(b, 0)).unsqueeze(0)).sum((-1, -2))


MATVEC = {QType.Q4_0: _q4_0, QType.Q4_1: _q4_1, QType.Q8_0: _q8_0}


def set_kernels(mode: str) -> None:
    """'eager' (default) or 'compiled'."""
    global _mode
    if mode not in ("eager", "compiled"):
        raise ValueError(f"kernels {mode!r}: expected eager or compiled")
    _mode = mode
    if mode == "compiled":
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)


def fused_matmul(x2: torch.Tensor, qtype, data: torch.Tensor) -> torch.Tensor | None:
    """x2 (M, n_cols) float32 @ W.T for a packed weight, or None when the fused path does not apply."""
    global _failed
    if _mode != "compiled" or _failed or x2.shape[0] > MAX_ROWS or qtype not in MATVEC:
        return None
    fn = _compiled.get(qtype)
    if fn is None:
        fn = _compiled[qtype] = torch.compile(MATVEC[qtype], dynamic=False)
    try:
        return fn(x2, data)
    except Exception as e:  # noqa: BLE001 - a toolchain problem must not stop generation
        _failed = True
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"tensorsplit: compiled kernels unavailable ({first}); using eager kernels", file=sys.stderr)
        return None

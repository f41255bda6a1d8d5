"""The native ops, for the model's hot path: `from tensorsplit.kernels.ops import ops; ops.matmul_q8(...)`.

Each op is looked up once, as its overload (torch.ops.tensorsplit.<name>.default), which skips the
packet's per-call overload resolution: about a microsecond per call, on a path that makes some
twenty calls per layer per token. Only valid once kernels.native() has loaded the library.
"""
from __future__ import annotations

import torch


class _Ops:
    def __getattr__(self, name: str):
        op = getattr(torch.ops.tensorsplit, name).default
        setattr(self, name, op)
        return op


ops = _Ops()

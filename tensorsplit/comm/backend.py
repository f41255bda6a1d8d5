"""Which torch.distributed backend a world uses, from the kinds of device its ranks hold.

  all CUDA             -> nccl (on a ROCm/HIP build of torch this is RCCL under the same name)
  all XPU              -> xccl, where this torch has it
  all CPU              -> gloo
  MPS, or mixed kinds  -> gloo, staging device tensors through host memory for each collective
`--backend` overrides the choice; a backend this torch lacks is an error, not a fallback.

`decode_graphs` is the one rule for whether a world replays its decode steps as CUDA graphs. Both are
decided once, in the world's plan (plan/world.py), which the workers follow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import TensorsplitError

BACKENDS = ("nccl", "gloo", "xccl")


@dataclass(frozen=True)
class BackendChoice:
    name: str        # torch.distributed backend name
    staging: bool    # collectives copy device tensors to host and back (gloo with non-CPU devices)
    why: str         # one line for logs and `info`


def _available(name: str) -> bool:
    if name == "nccl":
        return dist.is_nccl_available()
    if name == "gloo":
        return dist.is_gloo_available()
    if name == "xccl":
        return bool(getattr(dist, "is_xccl_available", lambda: False)())
    return False


def choose_backend(device_kinds: list[str], override: str | None = None, check_available: bool = True
                   ) -> BackendChoice:
    """device_kinds: the torch device type of every rank in the world ("cuda", "cpu", "xpu", "mps").
    check_available=False plans for a machine that has what the devices need (`info` planning for
    another machine): no check of this torch build."""
    kinds = set(device_kinds)
    available = _available if check_available else (lambda name: True)
    if override:
        if override not in BACKENDS:
            raise TensorsplitError(f"--backend {override!r} is not known; choose one of {', '.join(BACKENDS)}")
        if not available(override):
            raise TensorsplitError(f"--backend {override}: this torch build ({torch.__version__}) has no {override} "
                                   f"support")
        if override in ("nccl", "xccl") and kinds != {"cuda" if override == "nccl" else "xpu"}:
            raise TensorsplitError(f"--backend {override} needs every rank on "
                                   f"{'a GPU' if override == 'nccl' else 'an XPU'}; ranks use {sorted(kinds)}")
        return BackendChoice(override, override == "gloo" and kinds != {"cpu"}, "--backend")
    if kinds == {"cuda"} and available("nccl"):
        flavour = "RCCL" if getattr(torch.version, "hip", None) else "NCCL"
        return BackendChoice("nccl", False, f"every rank on a GPU: {flavour}")
    if kinds == {"xpu"} and available("xccl"):
        return BackendChoice("xccl", False, "every rank on an XPU: XCCL")
    if not available("gloo"):
        raise TensorsplitError("this torch build has no gloo backend, and the devices need it")
    if kinds == {"cpu"}:
        return BackendChoice("gloo", False, "every rank on the CPU: Gloo")
    return BackendChoice("gloo", True, f"devices {sorted(kinds)}: Gloo, staged through host memory")


def decode_graphs(device_kinds: list[str], backend: str, cuda_graphs: bool, experts: bool = False) -> bool:
    """Whether decode steps run as CUDA graphs (model/decode_graphs.py), with a static KV cache of one
    scratch slot more: only where every rank is a GPU on NCCL, whose all-reduces a graph can hold (a
    world staged through host memory, or on Gloo, cannot be captured; a CPU has no graphs), not for a
    mixture of experts (each step's routing decides which experts' weights are read, on the host), and
    not with --no-cuda-graphs."""
    return cuda_graphs and set(device_kinds) == {"cuda"} and backend == "nccl" and not experts

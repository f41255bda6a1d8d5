"""Which device each rank of a world uses, decided here and nowhere else.

  device_kinds("cuda,cpu", 2)      -> ["cuda", "cpu"]       the torch device type per rank (--device)
  rank_devices(["cuda"] * 3)       -> ["cuda:0", "cuda:1", "cuda:0"]   the device each rank will use
  visible_gpus(), default_nproc()  the GPUs the launcher may hand out, one worker per GPU by default
  default_threads(local_world)     CPU ranks of a node share its cores

Names follow the workers' own choice (worker/process.py `resolve_device`): local rank i on a GPU kind
gets GPU i % (GPUs visible), so ranks with the same name share one device; every CPU rank is on
"cpu". Nothing here starts a CUDA context: the launcher, which watches the workers for the whole run,
must not hold one on their devices.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from .errors import TensorsplitError

KINDS = ("cpu", "cuda", "xpu", "mps")


def device_kinds(device: str, world: int) -> list[str]:
    """--device 'auto' | 'cpu' | 'cuda' | a comma list with one entry per rank -> device type per rank."""
    parts = [p.strip() for p in device.split(",")]
    if len(parts) not in (1, world):
        raise TensorsplitError(f"--device {device!r} lists {len(parts)} devices for a world of {world} ranks")
    kinds = []
    for p in parts:
        kind = p.split(":")[0]
        if kind == "auto":
            kind = "cuda" if visible_gpus() else "cpu"
        if kind not in KINDS:
            raise TensorsplitError(f"--device {p!r}: expected auto, cpu, cuda, xpu or mps")
        kinds.append(kind)
    return kinds * world if len(kinds) == 1 else kinds


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out, without initialising CUDA in it."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() != ""]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch CUDA, no GPUs
        return []


def default_nproc() -> int:
    """Workers per node when --nproc-per-node is not given: one per visible GPU, else 1."""
    return max(1, len(visible_gpus()))


def default_threads(local_world: int) -> int:
    """CPU ranks share the cores: cores // ranks on this node (worker/pinning.py gives each its own)."""
    return max(1, len(os.sched_getaffinity(0)) // local_world)      # the cores this process may use


def device_count(kind: str, given: Mapping[str, int] | None) -> int:
    """Devices of `kind` the ranks will share out: the ones visible here, else (planning for another
    machine) as many as `given` (TENSORSPLIT_FREE_MEMORY's entries) names, else 1."""
    if kind in ("cpu", "mps"):
        return 1
    if kind == "cuda":
        n = len(visible_gpus())
    else:
        import torch
        module = getattr(torch, kind, None)
        n = module.device_count() if module is not None and module.is_available() else 0
    if n == 0 and given:
        n = len([d for d in given if d.startswith(f"{kind}:")])
    return max(n, 1)


def rank_devices(kinds: Sequence[str], given: Mapping[str, int] | None = None, nproc: int | None = None) -> list[str]:
    """Per rank, the device it will use: 'cpu', 'mps', 'cuda:1'. nproc: ranks per node (default: all on one
    node); rank r is local rank r % nproc of its node, and names repeat on every node."""
    counts = {k: device_count(k, given) for k in set(kinds)}
    nproc = nproc or len(kinds)
    return [k if k in ("cpu", "mps") else f"{k}:{r % nproc % counts[k]}" for r, k in enumerate(kinds)]

"""What each rank will hold once loaded, and `--split auto` resolved into ratios for a model and a node.

Per rank: its weights as loaded (loader.resident_bytes: the native kernels' tile layout on a CPU rank
when they are available, GGUF blocks on other devices, 1-D tensors as float32) and its KV cache for
the world's slots x context. `tensorsplit info` prints both before anything loads.

`resolve_split` turns `--split auto` into ratios once, where the world is started (the launcher, LLM,
serve), before any worker runs: the workers get the ratios in the WorldSpec, so they agree by
construction. The choice itself is model/auto_split.py; the free memory, free_memory.py.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Sequence

from .comm.backend import decode_graphs, planned_backend
from .errors import AutoSplitError
from .free_memory import FREE_MEMORY_ENV, free_memory, override, rank_devices
from .model import make_plan, open_model, parse_split
from .model.attention import KVCache
from .model.auto_split import fit_to_units, gib, rank_budgets, share_by_memory
from .model.loader import resident_bytes
from .model.numerics import Numerics
from .model.shard_plan import ShardPlan

AUTO = "auto"


@dataclass(frozen=True)
class RankMemory:
    rank: int
    device: str        # as the rank will use it: "cpu", "cuda:0"
    weights: int       # bytes of weights as loaded
    kv_cache: int      # bytes of its KV cache (its KV heads, every slot, the whole context)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


@dataclass(frozen=True)
class AutoSplit:
    split: str                 # the ratios as --split takes them, e.g. "0.2469,0.7531"
    free: dict[str, int]       # per device: the free bytes planned against
    given: bool                # free came from TENSORSPLIT_FREE_MEMORY rather than measured
    budgets: tuple[int, ...]   # per rank: bytes it may hold (model/auto_split.py rank_budgets)


def world_graphs(devices: Sequence[str], backend: str | None, cuda_graphs: bool) -> bool:
    """Whether the world the plan is for runs CUDA graphs (comm/backend.py decode_graphs, the rule the
    workers follow), from the devices ("cuda:0", "cpu"), --backend and --cuda-graphs."""
    kinds = [d.split(":")[0] for d in devices]
    return decode_graphs(kinds, planned_backend(kinds, backend), cuda_graphs)


def rank_memory(gf, cfg, plan: ShardPlan, devices: Sequence[str], n_slots: int, n_ctx: int, numerics: str,
                native: bool, graphs: bool) -> list[RankMemory]:
    """Bytes each rank of `plan` will hold; native: the native CPU kernels are available; graphs: decode
    runs as CUDA graphs (world_graphs), whose KV cache holds one scratch slot more."""
    elem = Numerics(numerics).kv_dtype.itemsize
    out = []
    for rs, device in zip(plan.ranks, devices):
        weights = resident_bytes(gf, rs.tensors, native and device == "cpu")
        kv = KVCache.planned_bytes(cfg.layer_windows, n_slots, n_ctx, rs.n_local_kv_heads, cfg.head_dim, elem,
                                   static=graphs)
        out.append(RankMemory(rs.rank, device, weights, kv))
    return out


def split_text(ratios: Sequence[float]) -> str:
    """Ratios as --split takes them, to 4 significant digits (parse_split normalises them again)."""
    return ",".join(f"{r:.4g}" for r in ratios)


def choose_split(gf, cfg, devices: Sequence[str], free: dict[str, int], n_slots: int, n_ctx: int, numerics: str,
                 native: bool, graphs: bool, given: bool = False) -> AutoSplit:
    """Ratios from the devices' free memory (model/auto_split.py), checked under the real plan."""
    world = len(devices)

    def held(ratios):
        ratios = parse_split(split_text(ratios), world)
        plan = make_plan(cfg, gf.tensors, world, ratios)
        return ratios, [m.total for m in rank_memory(gf, cfg, plan, devices, n_slots, n_ctx, numerics, native,
                                                     graphs)]

    equal = make_plan(cfg, gf.tensors, world)
    fixed = [resident_bytes(gf, [t for t in rs.tensors if t.axis is None], native and d == "cpu")
             for rs, d in zip(equal.ranks, devices)]
    memory = rank_memory(gf, cfg, equal, devices, n_slots, n_ctx, numerics, native, graphs)
    scaled = sum(m.total for m in memory) - sum(fixed)            # weights and KV cache shared out by ratio
    ratios = share_by_memory(devices, free, fixed, scaled)
    fine = max(1, sum(m.weights for m in memory) - sum(fixed))     # the weights follow the ratios closely
    ratios, _ = fit_to_units(ratios, rank_budgets(devices, free), devices, fine, held)
    return AutoSplit(split_text(ratios), dict(free), given, tuple(rank_budgets(devices, free)))


def auto_split(gf, cfg, devices: Sequence[str], n_slots: int, n_ctx: int, numerics: str,
               native: bool, graphs: bool) -> AutoSplit:
    """choose_split against the devices' free memory: TENSORSPLIT_FREE_MEMORY's figures, else measured."""
    return choose_split(gf, cfg, devices, free_memory(devices), n_slots, n_ctx, numerics, native, graphs,
                        given=override() is not None)


def check_auto_world(nnodes: int, torchrun: bool = False) -> None:
    """The worlds where --split auto cannot be resolved once for every rank."""
    if nnodes > 1:
        raise AutoSplitError(f"--split auto needs --nnodes 1 (got {nnodes}): each node sees only its own devices; "
                             "give --split R0,R1,..")
    if torchrun and override() is None:
        raise AutoSplitError("--split auto under torchrun: each rank would measure free memory on its own, so the "
                             "ranks could disagree; give --split R0,R1,.. (`tensorsplit info --split auto` prints "
                             f"one) or set {FREE_MEMORY_ENV}")


def resolve_split(spec, node, *, torchrun: bool = False, announce: bool = True):
    """The WorldSpec with --split auto replaced by ratios; any other split unchanged. Under torchrun
    every rank resolves it from TENSORSPLIT_FREE_MEMORY (the same figures, so the same ratios)."""
    if spec.split != AUTO:
        return spec
    from .kernels import native
    from .worker.process import device_kinds
    check_auto_world(node.nnodes, torchrun)
    devices = rank_devices(device_kinds(spec.device, node.world), override())
    gf, cfg = open_model(spec.model)
    try:
        auto = auto_split(gf, cfg, devices, spec.n_slots, spec.n_ctx, spec.numerics, native(),
                          world_graphs(devices, spec.backend, spec.cuda_graphs))
    finally:
        gf.close()
    if announce and not spec.quiet:
        where = ", ".join(f"{d} {gib(auto.free[d])}" for d in dict.fromkeys(devices))
        print(f"tensorsplit: --split auto: {auto.split} (free: {where}"
              f"{', from ' + FREE_MEMORY_ENV if auto.given else ''})", file=sys.stderr, flush=True)
    return replace(spec, split=auto.split)

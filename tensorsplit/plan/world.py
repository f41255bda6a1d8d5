"""The world's plan: every decision about a world made once, where the world starts, and read
everywhere else.

`plan_world(spec, node)` -> WorldPlan: per rank its device, thread count and bytes (weights as
loaded, KV cache, the CUDA graphs' scratch slot); for the world its backend, whether decode runs as
CUDA graphs, the KV cache's types and slots, and the split as float ratios (`--split auto` resolved
from the devices' free memory: free_memory.py, auto_split.py). The launcher (and LLM, serve) computes
it before any worker starts and hands it to every rank as JSON; `tensorsplit info` prints it; under
plain torchrun every rank computes it from the same inputs. Workers read its decisions and derive
none of them again.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ..comm.backend import BackendChoice, choose_backend, decode_graphs
from ..devices import default_threads, device_kinds, rank_devices
from ..errors import AutoSplitError, TensorsplitError
from ..model import make_plan, open_model, parse_split
from ..model.config import with_rope_options
from ..model.attention import KVCache
from ..model.loader import resident_bytes
from ..kernels.kv_types import kv_type
from ..model.shard_plan import ShardPlan
from ..spec import NodeSpec, WorldSpec
from .auto_split import fit_to_units, gib, rank_budgets, share_by_memory
from .free_memory import FREE_MEMORY_ENV, free_memory, override
from ..messages import say

AUTO = "auto"


@dataclass(frozen=True)
class RankPlan:
    rank: int
    device: str          # as the rank will use it: "cpu", "cuda:0"
    threads: int         # torch threads of the rank's process
    weights: int         # bytes of its weights as loaded (tiled layout on a CPU with the native kernels)
    kv_cache: int        # bytes of its KV cache: its KV heads, every sequence slot, the whole context
    graph_scratch: int   # bytes of the CUDA graphs' scratch slot in that cache (0 without graphs)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.graph_scratch

    @property
    def kind(self) -> str:
        return self.device.split(":")[0]


@dataclass(frozen=True)
class AutoSplit:
    free: dict[str, int]       # per device: the free bytes planned against
    given: bool                # free came from TENSORSPLIT_FREE_MEMORY rather than measured
    budgets: tuple[int, ...]   # per rank: bytes it may hold (auto_split.py rank_budgets)


@dataclass(frozen=True)
class WorldPlan:
    spec: WorldSpec
    nproc: int                   # ranks per node
    ratios: tuple[float, ...]    # the split, per rank (model/shard_plan.py turns it into whole units)
    backend: BackendChoice       # torch.distributed backend (comm/backend.py)
    cuda_graphs: bool            # decode steps replayed as CUDA graphs (comm/backend.py decode_graphs)
    kv_types: tuple[str, str]    # what the KV cache stores keys and values as (kernels/kv_types.py): f16, q8_0, ..
    native: bool                 # the native CPU kernels are available: CPU ranks hold their layout
    ranks: tuple[RankPlan, ...]
    auto: AutoSplit | None = None

    @property
    def world(self) -> int:
        return len(self.ranks)

    @property
    def kinds(self) -> list[str]:
        return [r.kind for r in self.ranks]

    def to_json(self) -> str:
        d = asdict(self)
        d["spec"] = json.loads(self.spec.to_json())
        return json.dumps(d)

    @staticmethod
    def from_json(text: str) -> "WorldPlan":
        d = json.loads(text)
        auto = d.pop("auto")
        return WorldPlan(**{**d, "spec": WorldSpec.from_json(json.dumps(d["spec"])), "ratios": tuple(d["ratios"]),
                            "kv_types": tuple(d["kv_types"]), "backend": BackendChoice(**d["backend"]),
                            "ranks": tuple(RankPlan(**r) for r in d["ranks"]),
                            "auto": None if auto is None else AutoSplit(auto["free"], auto["given"],
                                                                        tuple(auto["budgets"]))})

    def split_text(self) -> str:
        return split_text(self.ratios)


def check_world(spec: WorldSpec, node: NodeSpec) -> None:
    """Flag errors every rank would hit, reported once by whoever starts the world, before anything loads."""
    if node.nproc < 1:
        raise TensorsplitError(f"--nproc-per-node {node.nproc}: must be at least 1")
    if spec.split == AUTO:
        check_auto_world(node.nnodes)
    if node.nnodes > 1 and node.master_port is None:
        raise TensorsplitError("--master-port is required with --nnodes > 1 (every node must use the same one)")
    if not 0 <= node.node_rank < node.nnodes:
        raise TensorsplitError(f"--node-rank {node.node_rank} is outside 0..{node.nnodes - 1} (--nnodes {node.nnodes})")
    if not Path(spec.model).exists():
        raise TensorsplitError(f"{spec.model}: no such file")
    if spec.wire != "f32" and spec.wire_transport != "tcp":
        raise TensorsplitError(f"--wire {spec.wire} is sent by --wire-transport tcp only (not {spec.wire_transport})")
    if spec.split != AUTO:
        parse_split(spec.split, node.world)
    device_kinds(spec.device, node.world)


def check_auto_world(nnodes: int, torchrun: bool = False) -> None:
    """The worlds where --split auto cannot be resolved once for every rank."""
    if nnodes > 1:
        raise AutoSplitError(f"--split auto needs --nnodes 1 (got {nnodes}): each node sees only its own devices; "
                             "give --split R0,R1,..")
    if torchrun and override() is None:
        raise AutoSplitError("--split auto under torchrun: each rank would measure free memory on its own, so the "
                             "ranks could disagree; give --split R0,R1,.. (`tensorsplit info --split auto` prints "
                             f"one) or set {FREE_MEMORY_ENV}")


def plan_world(spec: WorldSpec, node: NodeSpec, *, here: bool = True, torchrun: bool = False,
               announce: bool = True) -> WorldPlan:
    """The plan of the world `spec` x `node`. here: the world runs on this machine, so its torch must
    have the backend the devices need (False for `info`, which may plan for another machine, as
    TENSORSPLIT_FREE_MEMORY lets it). torchrun: every rank plans for itself (--split auto only from
    TENSORSPLIT_FREE_MEMORY). announce: say what --split auto chose, on stderr."""
    from ..kernels import native as kernels_native
    world = node.world
    kinds = device_kinds(spec.device, world)
    devices = rank_devices(kinds, override(), node.nproc)
    backend = choose_backend(kinds, spec.backend, check_available=here)
    native = kernels_native(announce=here)
    threads = node.threads or default_threads(node.nproc)
    gf, cfg = open_model(spec.model)
    cfg = with_rope_options(cfg, **spec.rope_options)      # the workers apply them again; refused here first
    kv_types = spec.kv_types
    for t in kv_types:
        kv_type(t).check(cfg.head_dim)
    graphs = decode_graphs(kinds, backend.name, spec.cuda_graphs, experts=cfg.n_expert > 0)
    try:
        auto = None
        if spec.split == AUTO:
            check_auto_world(node.nnodes, torchrun)
            ratios, auto = choose_split(gf, cfg, devices, free_memory(devices), spec, native, graphs,
                                        given=override() is not None)
        else:
            ratios = parse_split(spec.split, world)
        shard_plan = make_plan(cfg, gf.tensors, world, ratios)
        ranks = tuple(_rank_plan(gf, cfg, shard_plan, r, devices[r], threads, spec, native, graphs)
                      for r in range(world))
    finally:
        gf.close()
    plan = WorldPlan(spec, node.nproc, tuple(ratios), backend, graphs, kv_types, native, ranks, auto)
    if auto is not None and announce and not spec.quiet:
        where = ", ".join(f"{d} {gib(auto.free[d])}" for d in dict.fromkeys(devices))
        say(f"--split auto: {plan.split_text()} (free: {where}{', from ' + FREE_MEMORY_ENV if auto.given else ''})")
    return plan


def _rank_plan(gf, cfg, shard_plan: ShardPlan, rank: int, device: str, threads: int, spec: WorldSpec, native: bool,
               graphs: bool) -> RankPlan:
    rs = shard_plan.ranks[rank]

    def kv(static: bool) -> int:
        return KVCache.planned_bytes(cfg.layer_windows, spec.n_slots, spec.n_ctx, rs.n_local_kv_heads,
                                     cfg.head_dim, spec.kv_types, static=static)
    return RankPlan(rank, device, threads, resident_bytes(gf, rs.tensors, native and device == "cpu"), kv(False),
                    kv(True) - kv(False) if graphs else 0)


def rank_totals(gf, cfg, ratios: Sequence[float], devices: Sequence[str], spec: WorldSpec, native: bool,
                graphs: bool) -> list[RankPlan]:
    """Every rank's bytes under the plan of `ratios`."""
    shard_plan = make_plan(cfg, gf.tensors, len(devices), ratios)
    return [_rank_plan(gf, cfg, shard_plan, r, d, 1, spec, native, graphs) for r, d in enumerate(devices)]


def choose_split(gf, cfg, devices: Sequence[str], free: dict[str, int], spec: WorldSpec, native: bool, graphs: bool,
                 given: bool = False) -> tuple[tuple[float, ...], AutoSplit]:
    """Ratios from the devices' free memory (auto_split.py), checked in whole units under the real plan."""
    world = len(devices)

    def held(ratios):
        ratios = parse_split(split_text(ratios), world)       # as printed, so `info`'s ratios are the run's
        return ratios, [m.total for m in rank_totals(gf, cfg, ratios, devices, spec, native, graphs)]

    equal = rank_totals(gf, cfg, parse_split(None, world), devices, spec, native, graphs)
    shard_plan = make_plan(cfg, gf.tensors, world)
    fixed = [resident_bytes(gf, [t for t in rs.tensors if t.axis is None], native and d == "cpu")
             for rs, d in zip(shard_plan.ranks, devices)]
    scaled = sum(m.total for m in equal) - sum(fixed)              # weights and KV cache shared out by ratio
    ratios = share_by_memory(devices, free, fixed, scaled)
    fine = max(1, sum(m.weights for m in equal) - sum(fixed))     # the weights follow the ratios closely
    ratios, _ = fit_to_units(ratios, rank_budgets(devices, free), devices, fine, held)
    return tuple(ratios), AutoSplit(dict(free), given, tuple(rank_budgets(devices, free)))


def split_text(ratios: Sequence[float]) -> str:
    """Ratios as --split takes them, to 4 significant digits, for people to read and paste."""
    return ",".join(f"{r:.4g}" for r in ratios)

"""What a world is made of, parsed once from the command line (or given to `LLM` / `serve`):

  WorldSpec  what every rank must agree on: the model, split, devices, context, slots, numerics
  NodeSpec   how this node starts its ranks: how many, which node, where the rendezvous is

Both travel to the workers as JSON (environment variables set by the launcher), never pickled,
and never with text: the job, which holds the prompt, goes to rank 0 alone (coordinator/jobs.py).
`check_world` reports the flag errors every rank would hit, once, before anyone starts.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import TensorsplitError
from .model.numerics import DEFAULT as DEFAULT_NUMERICS

WORLD_ENV = "TENSORSPLIT_WORLD"     # the WorldSpec, as JSON, for every rank the launcher starts
JOB_ENV = "TENSORSPLIT_JOB"         # rank 0 only: a file holding the job, as JSON


@dataclass(frozen=True)
class WorldSpec:
    model: Path
    split: str | None = None
    device: str = "auto"
    backend: str | None = None
    n_ctx: int = 2048          # KV-cache positions per slot
    n_slots: int = 1           # concurrent sequences
    timeout_s: float = 120.0   # every collective on the device group, and the rendezvous
    threads: int | None = None
    quiet: bool = False        # no load progress
    numerics: str = DEFAULT_NUMERICS   # "llamacpp" (8-bit matmul inputs, as ggml) or "exact" (model/numerics.py)
    cuda_graphs: bool = True   # decode steps as CUDA graphs where every rank is a GPU on NCCL (model/decode_graphs.py)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "model": str(self.model)})

    @staticmethod
    def from_json(text: str) -> "WorldSpec":
        d = json.loads(text)
        known = {f.name for f in fields(WorldSpec)}
        return WorldSpec(**{k: v for k, v in d.items() if k in known} | {"model": Path(d["model"])})


@dataclass(frozen=True)
class NodeSpec:
    nproc: int                 # workers on this node
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None   # None: pick a free one (single node only)
    threads: int | None = None       # per CPU worker; default cores // nproc
    pin_gpus: bool = True            # CUDA_VISIBLE_DEVICES per worker when GPUs are visible

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes


def check_world(spec: WorldSpec, node: NodeSpec) -> None:
    """Flag errors every rank would hit, reported once by whoever starts the world."""
    from .model.shard_plan import parse_split
    from .rank_memory import check_auto_world
    from .worker.process import device_kinds
    if node.nproc < 1:
        raise TensorsplitError(f"--nproc-per-node {node.nproc}: must be at least 1")
    if spec.split == "auto":
        check_auto_world(node.nnodes)
    if node.nnodes > 1 and node.master_port is None:
        raise TensorsplitError("--master-port is required with --nnodes > 1 (every node must use the same one)")
    if not 0 <= node.node_rank < node.nnodes:
        raise TensorsplitError(f"--node-rank {node.node_rank} is outside 0..{node.nnodes - 1} (--nnodes {node.nnodes})")
    if not Path(spec.model).exists():
        raise TensorsplitError(f"{spec.model}: no such file")
    if spec.split != "auto":      # resolved after these checks, by rank_memory.resolve_split
        parse_split(spec.split, node.world)
    device_kinds(spec.device, node.world)

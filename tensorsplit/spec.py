"""What a world is made of, parsed once from the command line (or given to `LLM` / `serve`):

  WorldSpec  what every rank must agree on: the model, split, devices, context, slots, numerics
  NodeSpec   how this node starts its ranks: how many, which node, where the rendezvous is

The WorldSpec travels to the workers inside the world's plan, as JSON (an environment variable set
by the launcher), never pickled,
and never with text: the job, which holds the prompt, goes to rank 0 alone (coordinator/jobs.py).
What the world becomes on these devices (the split resolved, bytes per rank, the backend) is
decided from them once, in plan/world.py.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .model.numerics import DEFAULT as DEFAULT_NUMERICS

WORLD_ENV = "TENSORSPLIT_WORLD"     # the WorldPlan (plan/world.py), as JSON, for every rank the launcher starts
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


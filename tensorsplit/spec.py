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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .devices import default_nproc
from .kernels.numerics import DEFAULT as DEFAULT_NUMERICS, Numerics

KV_TYPE_NAMES = ("f16", "bf16", "q8_0", "q4_0", "f32")      # kernels/kv_types.py
ROPE_SCALING_KINDS = ("none", "linear", "yarn")              # model/config.py
ROPE_OPTIONS = ("rope_scaling", "rope_scale", "rope_freq_base", "rope_freq_scale", "yarn_orig_ctx", "yarn_ext_factor",
                "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow")

WORLD_ENV = "TENSORSPLIT_WORLD"     # the WorldPlan (plan/world.py), as JSON, for every rank the launcher starts
JOB_ENV = "TENSORSPLIT_JOB"         # rank 0 only: a file holding the job, as JSON


SPLIT_HELP = ("Uneven shares per rank, e.g. 3,1 gives rank 0 three quarters of every layer; auto: shares by "
              "each device's free memory, after a 1 GiB reserve per rank and 5% spare (ranks on one device share "
              "it). TENSORSPLIT_FREE_MEMORY=cuda:0=24G,cpu=64G gives the free memory instead of measuring it "
              "(cuda=80G: each GPU), to plan for another machine.")


def option(default, *flags: str, help: str, keyword: str | None = None, **click):
    """A field that is also a world option: the CLI's flags and LLM's keyword (default: the field's name)
    come from here, with its help text; `click` holds the flag's type details (choices, metavar)."""
    return field(default=default, metadata={"flags": flags, "help": help, "keyword": keyword, "click": click})


@dataclass(frozen=True)
class WorldSpec:
    model: Path
    split: str | None = option(None, "--split", help=SPLIT_HELP, metavar="R0,R1,..|auto")
    device: str = option("auto", "--device", help="auto, cpu, cuda, xpu, mps, or one per rank: cuda,cpu (mixed "
                                                   "devices use Gloo).")
    backend: str | None = option(None, "--backend", help="Override the torch.distributed backend chosen from the "
                                                         "devices.", choices=("nccl", "gloo", "xccl"))
    n_ctx: int = 2048          # KV-cache positions per slot (each command has its own -c and default)
    n_slots: int = 1           # concurrent sequences (-np where a command decodes several)
    timeout_s: float = option(120.0, "--timeout", keyword="timeout",
                              help="Seconds before a collective or the rendezvous gives up (a dead or stuck rank).")
    wire_transport: str = option("tcp", "--wire-transport", choices=("tcp", "gloo"),
                                 help="How CPU workers on different nodes exchange each layer's sums, the step "
                                      "messages and the logits: tcp (one connection per pair of nodes, driven by "
                                      "the workers: a small all-reduce costs about the link's round trip) or gloo "
                                      "(torch.distributed's Gloo: 10-20x that on the hosts measured).")
    wire: str = option("f32", "--wire", choices=("f32", "bf16", "q8"),
                       help="What each layer's all-reduce sends between nodes (--wire-transport tcp; inside a node "
                            "nothing changes): f32 (the partial sums as computed, no rounding), bf16 (a quarter of "
                            "the bytes) or q8 (q8_0 blocks of 32: 34 bytes per 32 values, about a ninth). bf16 and "
                            "q8 round each node's part, which moves the logits a little: for a slow link.")
    quiet: bool = False        # no load progress
    profile: bool = False      # time each step's parts (bench --profile; worker/profile.py)
    numerics: str = option(DEFAULT_NUMERICS, "--numerics", choices=("llamacpp", "exact"),
                           help="llamacpp: llama.cpp's arithmetic (8-bit matmul inputs multiplied in integers, an "
                                "f16 KV cache): fast, and reproduces its logits. exact: float32 activations "
                                "throughout (slower; closer to the unquantized model on some models).")
    cache_type_k: str | None = option(None, "-ctk", "--cache-type-k", choices=KV_TYPE_NAMES,
                                      help="What the KV cache stores keys as, as llama.cpp's -ctk: f16, bf16, q8_0 "
                                           "(blocks of 32 with an f16 scale, 34 bytes: about half of f16), q4_0 "
                                           "(18 bytes per 32) or f32. Default: f16 under --numerics llamacpp, f32 "
                                           "under exact.")
    cache_type_v: str | None = option(None, "-ctv", "--cache-type-v", choices=KV_TYPE_NAMES,
                                      help="What the KV cache stores values as (-ctk's types). Default: as -ctk's "
                                           "default.")
    rope_scaling: str | None = option(None, "--rope-scaling", choices=ROPE_SCALING_KINDS,
                                      help="RoPE frequency scaling, as llama.cpp's: none, linear (positions divided by "
                                           "--rope-scale) or yarn (linear for slow dimensions, unscaled for fast ones, "
                                           "and a ramp between). Default: the file's.")
    rope_scale: float | None = option(None, "--rope-scale", type=float, metavar="N",
                                      help="RoPE context scaling factor: stretches the trained context N times "
                                           "(with --rope-scaling linear or yarn). Default: the file's.")
    rope_freq_base: float | None = option(None, "--rope-freq-base", type=float, metavar="N",
                                          help="RoPE base frequency of the global layers. Default: the file's.")
    rope_freq_scale: float | None = option(None, "--rope-freq-scale", type=float, metavar="N",
                                           help="RoPE frequency scaling factor: 1 / --rope-scale.")
    yarn_orig_ctx: int | None = option(None, "--yarn-orig-ctx", type=int, metavar="N",
                                       help="YaRN: the model's original training context. Default: the file's, else "
                                            "its context length.")
    yarn_ext_factor: float | None = option(None, "--yarn-ext-factor", type=float, metavar="N",
                                           help="YaRN: extrapolation mix, 0 for full interpolation. Default: 1 with "
                                                "yarn scaling, else 0.")
    yarn_attn_factor: float | None = option(None, "--yarn-attn-factor", type=float, metavar="N",
                                            help="YaRN: attention magnitude where --yarn-ext-factor is 0 (with a ramp, "
                                                 "llama.cpp's 1 + 0.1 ln(factor) applies). Default: 1.")
    yarn_beta_slow: float | None = option(None, "--yarn-beta-slow", type=float, metavar="N",
                                          help="YaRN: high correction dimension (alpha). Default: 1.")
    yarn_beta_fast: float | None = option(None, "--yarn-beta-fast", type=float, metavar="N",
                                          help="YaRN: low correction dimension (beta). Default: 32.")
    pin_cores: bool = option(True, "--pin-cores/--no-pin-cores",
                             help="Give each worker its own cores on its node (its --threads of them, disjoint from the "
                                  "other workers'), one thread per core. Off by itself when the workers want more "
                                  "threads than the node has cores.")
    cuda_graphs: bool = option(True, "--cuda-graphs/--no-cuda-graphs",
                               help="On GPUs with NCCL: replay decode steps (up to 16 sequences) as CUDA graphs, one "
                                    "per batch-size and context bucket, instead of launching every kernel from "
                                    "Python.")

    @property
    def kv_types(self) -> tuple[str, str]:
        """The KV cache's key and value types: -ctk / -ctv, each defaulting to the numerics' (f16 or f32)."""
        return Numerics(self.numerics).kv_types(self.cache_type_k, self.cache_type_v)

    @property
    def rope_options(self) -> dict:
        """The rope flags as given (model/config.py with_rope_options applies them over the file's)."""
        return {k: getattr(self, k) for k in ROPE_OPTIONS if getattr(self, k) is not None}

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "model": str(self.model)})

    @staticmethod
    def from_json(text: str) -> "WorldSpec":
        d = json.loads(text)
        known = {f.name for f in fields(WorldSpec)}
        return WorldSpec(**{k: v for k, v in d.items() if k in known} | {"model": Path(d["model"])})


@dataclass(frozen=True)
class NodeSpec:
    nproc: int = option(None, "--nproc-per-node", keyword="nproc_per_node", metavar="N",
                        help="Workers on this node (one per device). Default: one per visible GPU, else 1.")
    nnodes: int = option(1, "--nnodes", help="Nodes in the world.")
    node_rank: int = option(0, "--node-rank", help="This node's index.")
    master_addr: str = option("127.0.0.1", "--master-addr",
                              help="Address of node 0, where the rendezvous listens. Use a trusted network.")
    master_port: int | None = option(None, "--master-port", type=int, help="Rendezvous port. Default: a free port.")
    threads: int | None = option(None, "--threads", "-t", type=int,
                                 help="CPU threads per worker. Default: cores / workers on this node.")
    pin_gpus: bool = True            # CUDA_VISIBLE_DEVICES per worker when GPUs are visible

    def __post_init__(self):
        if self.nproc is None:           # the option's default: one worker per visible GPU, else 1
            object.__setattr__(self, "nproc", default_nproc())

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes


@dataclass(frozen=True)
class Option:
    """A world option as the CLI and LLM take it (declared by `option` on a WorldSpec or NodeSpec field)."""
    keyword: str          # LLM's keyword, and the CLI's parameter name
    flags: tuple[str, ...]
    help: str
    default: object
    spec: type            # WorldSpec or NodeSpec
    field: str
    click: dict


def world_options() -> list[Option]:
    """Every world option, in declaration order: WorldSpec's, then NodeSpec's."""
    return [Option(f.metadata["keyword"] or f.name, f.metadata["flags"], f.metadata["help"], f.default, cls, f.name,
                   f.metadata["click"])
            for cls in (WorldSpec, NodeSpec) for f in fields(cls) if "flags" in f.metadata]


def specs_from_options(model: Path, *, n_ctx: int, n_slots: int = 1, quiet: bool = False, profile: bool = False,
                       **values) -> tuple[WorldSpec, NodeSpec]:
    """The WorldSpec and NodeSpec of world options given by keyword (unknown keywords: TypeError)."""
    options = {o.keyword: o for o in world_options()}
    unknown = sorted(set(values) - set(options))
    if unknown:
        raise TypeError(f"unknown world option(s) {', '.join(unknown)}; the options are {', '.join(options)}")
    chosen = {o.keyword: values.get(o.keyword, o.default) for o in options.values()}
    of = {cls: {o.field: chosen[o.keyword] for o in options.values() if o.spec is cls} for cls in (WorldSpec, NodeSpec)}
    return (WorldSpec(model=model, n_ctx=n_ctx, n_slots=n_slots, quiet=quiet, profile=profile, **of[WorldSpec]),
            NodeSpec(**of[NodeSpec]))

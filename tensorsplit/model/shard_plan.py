"""The shard plan: which rows and columns of which tensor each rank owns.

Computed once, by `make_plan`, from the config, the tensor table (for quant block sizes and
byte counts), the world size and the split ratios. It is plain data: `tensorsplit info`
prints it, the loader reads it to copy each rank's bytes, and the forward pass reads each
rank's head, FFN and vocabulary ranges from it.

Rules (Megatron-style, as llama.cpp's tensor split mode and vLLM):
- Attention: while world <= KV-head units, a rank owns whole KV-head groups with their query
  heads. When ranks outnumber them, query heads are shared out instead and each rank holds
  the KV heads its query heads read (KV heads replicated).
- The input-split weights (attn_output, ffn_down) are cut only on quant-block boundaries, so
  head and FFN units are sized to make every cut a multiple of the largest block size.
- Fused weights (phi3's attn_qkv = [q; k; v], ffn_up = [gate; up]) are split per segment: a
  rank's slice is several row runs, its own q heads, KV heads, gate and up rows, concatenated.
- Mixture-of-experts layers: every expert is split as a dense FFN is (gate/up by output rows, down by
  input columns, cut on down's blocks), and one all-reduce completes the layer; the shared expert
  likewise, on its own plan. Experts have few blocks (Qwen3-30B-A3B's 768 is 3 K-quant blocks), so
  each expert is shared out by largest remainder with the leftover blocks going to the ranks in an
  order rotated by the expert's index: 2 ranks hold 2 + 1 blocks of the even experts and 1 + 2 of
  the odd ones, balanced over the experts a token picks, and 4 ranks can share 3 blocks (a rank may
  hold nothing of an expert). The router is mirrored: every rank routes alike, with no broadcast.
- token_embd and the output layer are split by vocabulary rows (a tied output shares the
  embedding's slice). Norms and the biases of input-split weights are mirrored.
- Uneven ratios are shared out by largest remainder, in whole units, at least one unit each.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from gguf import GGML_QUANT_SIZES

from ..errors import ShardPlanError
from .config import ModelConfig


@dataclass(frozen=True)
class TensorSlice:
    name: str
    split: str        # the tensor's role in arch.py: "q_rows", "o_cols", "mirror", ...
    axis: int | None  # ggml axis cut: 1 = rows (output), 0 = columns (input), None = mirrored
    ranges: tuple[tuple[int, int], ...]  # [start, end) runs along `axis`, concatenated in this order:
                      # one run, except for fused tensors (q, k, v rows; gate, up rows); the whole
                      # extent when mirrored; none for a 3-D expert tensor (see expert_ranges)
    nbytes: int       # bytes this rank holds of the tensor
    expert_ranges: tuple[tuple[int, int], ...] = ()   # 3-D expert tensors: [start, end) along `axis`
                      # per expert (empty where this rank holds none of that expert)

    @property
    def start(self) -> int:
        assert len(self.ranges) == 1, (self.name, self.ranges)
        return self.ranges[0][0]

    @property
    def end(self) -> int:
        assert len(self.ranges) == 1, (self.name, self.ranges)
        return self.ranges[0][1]

    @property
    def length(self) -> int:
        """Elements along `axis` this rank holds (all runs together)."""
        return sum(b - a for a, b in self.ranges)


@dataclass(frozen=True)
class RankShard:
    rank: int
    q_heads: tuple[int, int]   # [start, end) of global query heads
    kv_heads: tuple[int, int]  # [start, end) of global KV heads (may overlap other ranks': replicated)
    ffn: tuple[int, int]       # [start, end) of the FFN hidden dim
    vocab: tuple[int, int]     # [start, end) of vocabulary rows
    tensors: tuple[TensorSlice, ...]
    ffn_exp: tuple[tuple[int, int], ...] = ()   # per expert: [start, end) of its FFN hidden dim (MoE)
    ffn_shexp: tuple[int, int] = (0, 0)   # [start, end) of the shared expert's FFN hidden dim

    @property
    def expert_nbytes(self) -> int:
        """Bytes of expert weights (routed and shared) this rank holds, as in the file."""
        return sum(t.nbytes for t in self.tensors if t.split.startswith(("exp_", "shexp_")))

    @property
    def n_local_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_local_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def local_ff(self) -> int:
        return self.ffn[1] - self.ffn[0]

    @property
    def local_vocab(self) -> int:
        return self.vocab[1] - self.vocab[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def slice_of(self, name: str) -> TensorSlice:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


@dataclass(frozen=True)
class ShardPlan:
    world: int
    ratios: tuple[float, ...]
    kv_replicated: bool        # True when ranks outnumber KV-head units and KV heads are replicated
    head_unit: int             # query heads per indivisible unit
    ffn_unit: int              # FFN columns per indivisible unit
    ranks: tuple[RankShard, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def parse_split(text: str | None, world: int) -> tuple[float, ...]:
    """'3,1' -> (0.75, 0.25). None -> equal shares. Errors name the flag and the value."""
    if text is None or text == "":
        return tuple([1.0 / world] * world)
    if text == "auto":   # rank_memory.resolve_split turns it into ratios before any plan is made
        raise ShardPlanError("--split auto is resolved from free memory where the world starts, not by a rank; "
                             "give --split R0,R1,..")
    try:
        parts = [float(p) for p in str(text).split(",")]
    except ValueError:
        raise ShardPlanError(f"--split {text!r}: expected comma-separated numbers such as 3,1") from None
    if len(parts) != world:
        raise ShardPlanError(f"--split {text!r} has {len(parts)} shares but the world has {world} ranks")
    if any(not math.isfinite(p) or p <= 0 for p in parts):
        raise ShardPlanError(f"--split {text!r}: every share must be a positive number")
    total = sum(parts)
    return tuple(p / total for p in parts)


def apportion(n_units: int, ratios: Sequence[float], what: str) -> list[tuple[int, int]]:
    """Share n_units among ranks by ratio (largest remainder), >= 1 each; return [start, end) per rank."""
    world = len(ratios)
    if n_units < world:
        raise ShardPlanError(f"cannot split {what} over {world} ranks: every rank needs at least one")
    ideal = [r * n_units for r in ratios]
    counts = [max(1, math.floor(x)) for x in ideal]
    while sum(counts) > n_units:  # the max(1, .) floor can overshoot: take from the most over-served
        i = max((k for k in range(world) if counts[k] > 1), key=lambda k: counts[k] - ideal[k])
        counts[i] -= 1
    while sum(counts) < n_units:  # largest remainder; ties go to the lower rank
        i = max(range(world), key=lambda k: (ideal[k] - counts[k], -k))
        counts[i] += 1
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds


def _block(tensors: Mapping[str, object], name: str) -> int:
    return GGML_QUANT_SIZES[tensors[name].qtype][0]


def _lcm_blocks(tensors: Mapping[str, object], names: Sequence[str]) -> int:
    out = 1
    for n in names:
        if n in tensors:
            out = math.lcm(out, _block(tensors, n))
    return out


def _row_bytes(info, n_cols: int) -> int:
    block, type_size = GGML_QUANT_SIZES[info.qtype]
    return n_cols // block * type_size


def make_plan(cfg: ModelConfig, tensors: Mapping[str, object], world: int,
              ratios: Sequence[float] | None = None) -> ShardPlan:
    """Plan every rank's share. `tensors` maps names to TensorInfo (shape in ggml order, qtype)."""
    if world < 1:
        raise ShardPlanError(f"world size must be at least 1, got {world}")
    ratios = tuple(ratios) if ratios is not None else tuple([1.0 / world] * world)
    if len(ratios) != world:
        raise ShardPlanError(f"{len(ratios)} split ratios for a world of {world} ranks")
    hd, g = cfg.head_dim, cfg.group_size
    o_names = [f"blk.{i}.attn_output.weight" for i in range(cfg.n_layers)]
    down_names = [f"blk.{i}.ffn_down.weight" for i in range(cfg.n_layers)]

    # Attention. attn_output's columns are cut at (head boundary) x head_dim, which must be a
    # multiple of its block size: a unit is the fewest heads whose width is a whole number of blocks.
    o_block = _lcm_blocks(tensors, o_names)
    group_unit = o_block // math.gcd(g * hd, o_block)      # KV groups per unit
    n_group_units = cfg.n_kv_heads // group_unit
    if world <= n_group_units:
        kv_replicated, head_unit = False, group_unit * g
        groups = apportion(n_group_units, ratios, f"{n_group_units} KV-head units")
        q_ranges = [(a * head_unit, b * head_unit) for a, b in groups]
    else:
        kv_replicated, head_unit = True, o_block // math.gcd(hd, o_block)
        n_units = cfg.n_heads // head_unit
        why = (f"{cfg.n_heads} query heads" if head_unit == 1 else
               f"{cfg.n_heads} query heads ({n_units} units of {head_unit}: head_dim {hd} "
               f"and attn_output's {o_block}-element quant blocks)")
        units = apportion(n_units, ratios, why)
        q_ranges = [(a * head_unit, b * head_unit) for a, b in units]
    kv_ranges = [(q0 // g, (q1 - 1) // g + 1) for q0, q1 in q_ranges]

    # FFN: ffn_down's columns are cut, on its largest block size over all layers; the experts' and
    # the shared expert's likewise, on their own down weights.
    none = [(0, 0)] * world
    ffn_unit, ffn_ranges = (1, none) if cfg.n_expert else _ffn_plan(tensors, down_names, cfg.n_ff, ratios, "the FFN")
    exp_ranges, shexp_ranges = [()] * world, none
    if cfg.n_expert:
        exp_ranges = _expert_plan(tensors, [f"blk.{i}.ffn_down_exps.weight" for i in range(cfg.n_layers)],
                                  cfg.n_ff_exp, cfg.n_expert, ratios)
    if cfg.n_ff_shexp:
        _, shexp_ranges = _ffn_plan(tensors, [f"blk.{i}.ffn_down_shexp.weight" for i in range(cfg.n_layers)],
                                    cfg.n_ff_shexp, ratios, "the shared expert's FFN")
    vocab_ranges = apportion(cfg.vocab_size, ratios, f"a vocabulary of {cfg.vocab_size}")

    ranks = []
    for r in range(world):
        q_rows = (q_ranges[r][0] * hd, q_ranges[r][1] * hd)
        kv_rows = (kv_ranges[r][0] * hd, kv_ranges[r][1] * hd)
        f0, f1 = ffn_ranges[r]
        extents = {  # role -> [start, end) runs in elements along the role's axis
            "q_rows": (q_rows,),
            "kv_rows": (kv_rows,),
            "qkv_rows": (q_rows, _shift(kv_rows, cfg.q_dim), _shift(kv_rows, cfg.q_dim + cfg.kv_dim)),
            "ffn_rows": (ffn_ranges[r],),
            "gate_up_rows": ((f0, f1), (cfg.n_ff + f0, cfg.n_ff + f1)),
            "o_cols": (q_rows,),
            "ffn_cols": (ffn_ranges[r],),
            "exp_rows": exp_ranges[r],
            "exp_cols": exp_ranges[r],
            "exp_bias": exp_ranges[r],
            "exp_gate_up_rows": exp_ranges[r],
            "q_heads": (q_ranges[r],),
            "shexp_rows": (shexp_ranges[r],),
            "shexp_cols": (shexp_ranges[r],),
            "vocab_rows": (vocab_ranges[r],),
        }
        slices = tuple(_slice(name, role, tensors[name], extents)
                       for name, role in _roles(cfg, tensors))
        ranks.append(RankShard(r, q_ranges[r], kv_ranges[r], ffn_ranges[r], vocab_ranges[r], slices,
                               exp_ranges[r], shexp_ranges[r]))
    return ShardPlan(world, ratios, kv_replicated, head_unit, ffn_unit, tuple(ranks))


def _ffn_plan(tensors, down_names, n_ff: int, ratios, what: str) -> tuple[int, list[tuple[int, int]]]:
    """(unit, [start, end) per rank) of an FFN hidden dim of n_ff, cut on its down weights' largest block."""
    unit = _lcm_blocks(tensors, down_names)
    if n_ff % unit:
        raise ShardPlanError(f"{what}: width {n_ff} is not a multiple of its down weight's block size {unit}")
    return unit, [(a * unit, b * unit) for a, b in
                  apportion(n_ff // unit, ratios, f"{what} ({n_ff} = {n_ff // unit} blocks of {unit})")]


def _expert_plan(tensors, down_names, n_ff: int, n_expert: int, ratios) -> list[tuple[tuple[int, int], ...]]:
    """Per rank, per expert: [start, end) of the expert's hidden dim, cut on its down weights' largest
    block. The experts are shared out in turn by largest remainder of each rank's share plus what it is
    owed from the experts before (so that over the experts every rank holds its ratio), ties going to
    the ranks in an order rotated by the expert's index."""
    unit = _lcm_blocks(tensors, down_names)
    if n_ff % unit:
        raise ShardPlanError(f"every expert's FFN: width {n_ff} is not a multiple of its down weight's block size {unit}")
    n_units, world = n_ff // unit, len(ratios)
    per_rank: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    owed = [0.0] * world
    for e in range(n_expert):
        ideal = [max(0.0, r * n_units + o) for r, o in zip(ratios, owed)]
        ideal = [x * n_units / sum(ideal) for x in ideal]
        counts = [math.floor(x + 1e-9) for x in ideal]
        order = sorted(range(world), key=lambda k: (-round(ideal[k] - counts[k], 9), (k - e) % world))
        for k in order[:n_units - sum(counts)]:
            counts[k] += 1
        owed = [o + r * n_units - c for o, r, c in zip(owed, ratios, counts)]
        start = 0
        for r, c in enumerate(counts):
            per_rank[r].append((start * unit, (start + c) * unit))
            start += c
    return [tuple(p) for p in per_rank]


def _roles(cfg: ModelConfig, tensors: Mapping[str, object]):
    """(name, split role) for every tensor of the model present in the file, in a stable order."""
    yield "token_embd.weight", "vocab_rows"
    if not cfg.tied_output:
        yield "output.weight", "vocab_rows"
    yield "output_norm.weight", "mirror"
    for role in cfg.spec.global_tensors:
        if role.suffix in tensors:
            yield role.suffix, role.split
    for i in range(cfg.n_layers):
        for role in cfg.spec.layer_tensors:
            name = f"blk.{i}.{role.suffix}"
            if name in tensors:
                yield name, role.split


def _shift(r: tuple[int, int], by: int) -> tuple[int, int]:
    return r[0] + by, r[1] + by


def _slice(name: str, role: str, info, extents) -> TensorSlice:
    shape = tuple(int(d) for d in info.shape)
    if role in ("mirror", "router"):
        return TensorSlice(name, role, None, ((0, shape[-1]),), int(info.nbytes))
    ranges = extents[role]
    n = sum(b - a for a, b in ranges)
    if len(shape) == 1:          # a bias: its one axis is the output axis
        return TensorSlice(name, role, 0, ranges, _row_bytes(info, n))
    n_cols, n_rows = shape[0], shape[1]
    if role == "exp_bias":       # 2-D [n_ff_exp, n_expert]: each expert's bias cut as its gate/up rows
        return TensorSlice(name, role, 0, (), sum(_row_bytes(info, b - a) for a, b in ranges), tuple(ranges))
    if role == "exp_gate_up_rows":   # 3-D [n_cols, 2 n_ff_exp, n_expert]: the expert's range in each half
        return TensorSlice(name, role, 1, (), 2 * sum((b - a) * _row_bytes(info, shape[0]) for a, b in ranges),
                           tuple(ranges))
    if role in ("exp_rows", "exp_cols"):   # 3-D [n_cols, n_rows, n_expert]: each expert cut on its own
        if role == "exp_cols":
            block = GGML_QUANT_SIZES[info.qtype][0]
            assert all(a % block == 0 and b % block == 0 for a, b in ranges), (name, block)
            nbytes = sum(n_rows * _row_bytes(info, b - a) for a, b in ranges)
        else:
            nbytes = sum((b - a) * _row_bytes(info, n_cols) for a, b in ranges)
        return TensorSlice(name, role, 0 if role == "exp_cols" else 1, (), nbytes, tuple(ranges))
    n_mats = math.prod(shape[2:])
    if role.endswith("_cols"):
        block = GGML_QUANT_SIZES[info.qtype][0]
        assert len(ranges) == 1 and all(x % block == 0 for x in ranges[0]), (name, ranges, block)
        return TensorSlice(name, role, 0, ranges, n_mats * n_rows * _row_bytes(info, n))
    return TensorSlice(name, role, 1, ranges, n_mats * n * _row_bytes(info, n_cols))


def format_plan(plan: ShardPlan, cfg: ModelConfig, verbose: bool = False) -> str:
    """A human-readable table of the plan: per rank heads, FFN, vocab, bytes; per tensor with verbose."""
    lines = [f"world {plan.world}, shares {', '.join(f'{r:.3f}' for r in plan.ratios)}"
             f"{', KV heads replicated' if plan.kv_replicated else ''}"]
    moe = cfg.n_expert > 0
    ffn = "expert ffn" if moe else "ffn"
    lines.append(f"{'rank':>4}  {'q heads':>9}  {'kv heads':>9}  {ffn:>13}  {'vocab':>15}  {'weights':>10}"
                 + (f"  {'experts':>10}" if moe else ""))
    for rs in plan.ranks:
        lines.append(f"{rs.rank:>4}  {_rng(rs.q_heads):>9}  {_rng(rs.kv_heads):>9}  "
                     f"{_share(rs.ffn_exp, cfg.n_ff_exp) if moe else _rng(rs.ffn):>13}  {_rng(rs.vocab):>15}  "
                     f"{_mib(rs.nbytes):>10}"
                     + (f"  {_mib(rs.expert_nbytes):>10}" if moe else ""))
    if verbose:
        for rs in plan.ranks:
            lines.append(f"rank {rs.rank}:")
            for t in rs.tensors:
                runs = (" + ".join(_rng(r) for r in t.ranges) or
                        f"{sum(b - a for a, b in t.expert_ranges)} in all experts")
                where = "mirrored" if t.axis is None else f"{'rows' if t.axis == 1 else 'cols'} {runs}"
                lines.append(f"  {t.name:<28} {where:<34} {t.nbytes:>12,d} B")
    return "\n".join(lines)


def _share(per_expert, width: int) -> str:
    """A rank's part of all experts' hidden dims, as a fraction ("0.500 of all")."""
    held = sum(b - a for a, b in per_expert)
    return f"{held / max(1, width * len(per_expert)):.3f} of all"


def _rng(r: tuple[int, int]) -> str:
    return f"{r[0]}-{r[1] - 1}" if r[1] - r[0] > 1 else f"{r[0]}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

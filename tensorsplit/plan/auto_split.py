"""`--split auto`: split ratios from how much memory each rank's device has free. Plain arithmetic on
byte counts: it knows nothing of how free memory is measured (free_memory.py) nor of the model
(rank_memory.py hands in what a plan costs).

Rules:
- A device keeps FREE_MARGIN of its free memory spare, and RANK_RESERVE per rank on it for what a
  worker holds besides its shard. The rest is the device's usable memory; ranks on the same device
  (two CPU ranks, two ranks on one GPU) share it equally: that is each rank's budget.
- Every rank holds some bytes whatever its share (mirrored tensors: norms); the rest (its slices of
  the weights, its KV heads) scales with its share; a rank's room is its budget less the fixed bytes.
- Accelerators first: every step waits for the slowest rank, and a CPU rank is several times slower
  than a GPU on the same share. So where a world mixes CPU and accelerator ranks, the accelerator
  ranks take as much as their room holds and the CPU ranks only the rest (a token share, one unit
  each, when the accelerators hold it all). Ranks of one kind share in proportion to their room, so
  each fills the same fraction of it.
- The plan shares whole units (KV-head groups, FFN blocks, vocabulary rows), so a rank can get more
  than its share (one KV head of three is a third of the cache). `fit_to_units` checks every rank's
  bytes under the real plan and moves share from any rank over its budget to the others, until none
  is over (or says which rank cannot fit).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from ..errors import AutoSplitError

GiB = 2**30

# Per rank, besides its shard: the Python interpreter and torch (~0.4 GiB resident on a CPU rank), a
# CUDA context and cuBLAS workspace (~0.5 GiB on a GPU rank), and the activations of a 512-token prompt
# chunk (tens of MiB on models of tens of GiB).
RANK_RESERVE = 1 * GiB
# Of each device's free memory, kept spare: allocator fragmentation, and other processes that grow
# between the measurement and the end of loading.
FREE_MARGIN = 0.05
# A CPU rank's share when the accelerators hold the whole model: a token share (the plan gives every rank
# at least one unit of heads, FFN and vocabulary), since a CPU rank was asked for.
MIN_CPU_SHARE = 0.001
# Rounds of shrinking an over-budget rank's share in fit_to_units before giving up.
FIT_ROUNDS = 16


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def rank_budgets(devices: Sequence[str], free: Mapping[str, int]) -> list[int]:
    """Bytes each rank may hold: its device's free memory, less FREE_MARGIN and RANK_RESERVE per rank on
    the device, shared equally by the ranks on it. devices: one name per rank ("cuda:0", "cpu")."""
    on_device = {d: devices.count(d) for d in devices}
    budgets = []
    for d in devices:
        assert d in free, (d, sorted(free))
        usable = int(free[d] * (1 - FREE_MARGIN)) - on_device[d] * RANK_RESERVE
        if usable <= 0:
            n = on_device[d]
            raise AutoSplitError(f"--split auto: {d} has {gib(free[d])} free, less than the {gib(n * RANK_RESERVE)} "
                                 f"its {n} rank(s) need besides their shards; use fewer ranks on it, or give --split")
        budgets.append(usable // on_device[d])
    return budgets


def _free_list(devices: Sequence[str], free: Mapping[str, int]) -> str:
    return ", ".join(f"{d} has {gib(free[d])} free" for d in dict.fromkeys(devices))


def share_by_memory(devices: Sequence[str], free: Mapping[str, int], fixed: Sequence[int],
                    scaled: int) -> tuple[float, ...]:
    """Ratios from each rank's room (its budget less its fixed bytes): accelerator ranks first, then CPU
    ranks (see the rules above). fixed: per rank, bytes held whatever the share; scaled: bytes over all
    ranks that are shared out by ratio."""
    assert len(devices) == len(fixed) and scaled >= 0, (devices, fixed, scaled)
    budgets = rank_budgets(devices, free)
    room = [b - f for b, f in zip(budgets, fixed)]
    if scaled > sum(room) or min(room) <= 0:
        held = scaled + sum(fixed)
        raise AutoSplitError(f"--split auto: the model needs {gib(held + len(devices) * RANK_RESERVE)} on "
                             f"{len(devices)} rank(s) ({gib(held)} of weights and KV cache, {gib(RANK_RESERVE)} per "
                             f"rank besides) and {FREE_MARGIN:.0%} of free memory spare; {_free_list(devices, free)}")
    fast = [r for r, d in enumerate(devices) if d != "cpu"]
    slow = [r for r, d in enumerate(devices) if d == "cpu"]
    if not fast or not slow:
        total = sum(room)
        return tuple(r / total for r in room)
    fast_room = sum(room[r] for r in fast)
    on_fast = min(scaled, fast_room)
    rest = max(scaled - on_fast, int(MIN_CPU_SHARE * scaled) * len(slow))
    slow_room = sum(room[r] for r in slow)
    held = [0.0] * len(devices)
    for r in fast:
        held[r] = on_fast * room[r] / fast_room
    for r in slow:
        held[r] = rest * room[r] / slow_room
    total = sum(held)
    return tuple(h / total for h in held)


def fit_to_units(ratios: Sequence[float], budgets: Sequence[int], devices: Sequence[str], fine: int,
                 held: Callable[[tuple[float, ...]], tuple[tuple[float, ...], Sequence[int]]],
                 ) -> tuple[tuple[float, ...], list[int]]:
    """Shrink the share of any rank whose bytes under the real plan (whole units) exceed its budget, and
    give what it loses to the ranks within theirs, until every rank fits.

    fine: bytes over all ranks that follow the ratios closely (the weights sliced by FFN blocks and
    vocabulary rows), so an excess of e bytes is undone by taking e / fine off the rank's ratio; the
    coarse parts (whole KV heads) move only when a ratio crosses a unit boundary.
    held(ratios) -> (the ratios as the plan takes them, bytes per rank under that plan)."""
    assert fine > 0, fine
    ratios = tuple(ratios)
    for _ in range(FIT_ROUNDS):
        ratios, nbytes = held(ratios)
        over = {r: (n - b) / fine for r, (n, b) in enumerate(zip(nbytes, budgets)) if n > b}
        if not over:
            return ratios, list(nbytes)
        under = sum(x for r, x in enumerate(ratios) if r not in over)
        cut = [x - over[r] if r in over else x for r, x in enumerate(ratios)]
        if under == 0 or min(cut) <= 0:
            break
        grow = 1 + sum(over.values()) / under
        ratios = tuple(x if r in over else x * grow for r, x in enumerate(cut))
    r = min(over, key=lambda k: -over[k])
    raise AutoSplitError(f"--split auto: rank {r} ({devices[r]}) would hold {gib(nbytes[r])} once shares are "
                         f"rounded to whole heads and FFN blocks, over its {gib(budgets[r])}; give --split")

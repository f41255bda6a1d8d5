"""Other ways to all-reduce a small tensor with torch.distributed's own transport (Gloo), for
`bench --comm` to set beside Gloo's all_reduce and the wire (issue 23 asked which of them comes within
2x of the link's round trip; none did on the machines measured, see comm/wire.py).

Each returns the sum in place on every rank of `group`, with the same bits on every rank:
  exchange     every rank sends its x to every other rank (isend/irecv) and adds them in rank order:
               one round trip between two ranks
  doubling     recursive doubling: log2(world) exchanges with the rank 2^k away, the lower half's sum
               first (a power-of-two world only)
  all_gather   all_gather_into_tensor, then a sum in rank order
"""
from __future__ import annotations

import torch
import torch.distributed as dist

ALGORITHMS = ("exchange", "doubling", "all_gather")


def _sum_in_order(parts: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    acc = parts[0].clone()
    for p in parts[1:]:
        acc += p
    return out.copy_(acc)


def exchange(x: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
    parts = [x if r == rank else torch.empty_like(x) for r in range(world)]
    ops = [dist.P2POp(dist.isend, x, r, group) for r in range(world) if r != rank]
    ops += [dist.P2POp(dist.irecv, parts[r], r, group) for r in range(world) if r != rank]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return _sum_in_order(parts, x)


def doubling(x: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
    assert world & (world - 1) == 0, f"recursive doubling needs a power-of-two world, not {world}"
    theirs = torch.empty_like(x)
    step = 1
    while step < world:
        peer = rank ^ step
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer, group),
                                            dist.P2POp(dist.irecv, theirs, peer, group)]):
            work.wait()
        if peer < rank:          # the lower block's sum first: both partners add alike
            x.copy_(theirs + x)
        else:
            x.add_(theirs)
        step *= 2
    return x


def all_gather(x: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
    flat = torch.empty(world * x.numel(), dtype=x.dtype)
    dist.all_gather_into_tensor(flat, x.reshape(-1), group=group)
    return _sum_in_order(list(flat.view(world, *x.shape)), x)


def run(name: str, x: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
    return {"exchange": exchange, "doubling": doubling, "all_gather": all_gather}[name](x, group, rank, world)

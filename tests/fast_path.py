"""The check every fast-path test makes: the fast kernel computed matmuls, and never fell back.

A fallback computes the same numbers to float32 rounding, so comparing results cannot catch it;
a rank's kernels wrapped in tensorsplit/kernels/counting.py count which path ran, and this reads
the counts: in-process from a `Counting`'s `counts`, from worker processes through the files they write when
TENSORSPLIT_KERNEL_PATHS names a folder (`rank_counts`).
"""
from __future__ import annotations

import json
from pathlib import Path

from tensorsplit.kernels.counting import fallbacks


def assert_fast_path(counts: dict[str, int], kernel: str, *, exclusive: bool = False) -> None:
    """`kernel` ran at least once and nothing fell back; with exclusive, nothing else ran either."""
    assert counts.get(kernel, 0) > 0, f"the {kernel} kernels never ran: {counts}"
    assert not fallbacks(counts), f"fell back to the eager path: {counts}"
    if exclusive:
        assert set(counts) == {kernel}, f"not only the {kernel} kernels ran: {counts}"


def rank_counts(folder: Path, world: int) -> list[dict[str, int]]:
    """The counts each rank of a finished job wrote into `folder`, in rank order."""
    files = [Path(folder) / f"rank{r}.json" for r in range(world)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"no kernel path counts from {missing} in {folder}"
    return [json.loads(f.read_text()) for f in files]

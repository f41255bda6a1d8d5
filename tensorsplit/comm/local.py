"""An in-process world: every rank is a thread, all-reduce is a barrier and a sum.

Used by tests and by `tensorsplit.model` users who want to run all ranks of a plan inside one
process (each rank's torch ops release the GIL, so ranks do run in parallel). The sum is
taken in rank order on every rank, so all ranks see bit-identical results, as with a real
all-reduce.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class ThreadWorld:
    def __init__(self, world: int, timeout: float = 120.0):
        self.world, self.timeout = world, timeout
        self._barrier = threading.Barrier(world, timeout=timeout)
        self._slots: list[torch.Tensor | None] = [None] * world

    def reducer(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The all-reduce (sum) for `rank`: every rank must call it the same number of times."""
        def all_reduce(x: torch.Tensor) -> torch.Tensor:
            self._slots[rank] = x
            self._barrier.wait()                  # all partial sums are posted
            total = self._slots[0].clone()
            for other in self._slots[1:]:
                total += other
            self._barrier.wait()                  # all ranks have read before anyone posts again
            return total
        return all_reduce

    def run(self, fn: Callable[[int], T]) -> list[T]:
        """Run fn(rank) on one thread per rank; return the results in rank order, re-raising the first error."""
        results: list = [None] * self.world
        errors: list[BaseException | None] = [None] * self.world

        def body(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
                errors[rank] = e
                self._barrier.abort()   # wake the other ranks instead of leaving them waiting

        threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}") for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
                     next((e for e in errors if e is not None), None))
        if first is not None:
            raise first
        return results

"""Decode steps replayed as CUDA graphs: one graph per (rows, context) bucket.

A decode step on a GPU is a few hundred small kernels; launched one by one from Python, the host
time per step (~60 us per layer) is longer than the GPU's work on a mid-sized model. A CUDA graph
launches the whole step at once. A graph fixes every shape and every address, so a step is run as
a *bucket*:

  rows     the step's tokens padded up to 1, 2, 4, 8 or 16 (ROW_BUCKETS); the padding rows read
           token 0 at position 0 and write to the cache's scratch slot, and their logits are dropped;
  context  global layers read the first kv_len positions of each row's slot, kv_len the smallest
           power of two >= 256 (or n_ctx) past every position of the step; sliding-window layers
           read their whole ring. What a row may not see is masked (Attention.decode_static).

Each bucket owns static input buffers (ids, positions, slots, on the device) and the output it
was captured with; a step copies its inputs in, replays, and reads the output. The KV cache is
allocated once (static) and the all-reduces of the row-parallel layers are captured inside the
graph (NCCL supports capture). A step qualifies when it has at most 16 tokens, one per slot (a
prompt chunk has several tokens of one slot and runs eagerly, as does anything on a CPU).

mode "cuda" captures (after one eager warm-up run of the bucket, which also runs the collectives
every rank runs: capture itself launches nothing). mode "eager" runs the same fixed-shape step
without capture: what the tests on a CPU run, and where a capture failed. Either way every rank
runs the same collectives in the same order, so ranks may differ in mode.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

ROW_BUCKETS = (1, 2, 4, 8, 16)
MIN_KV_BUCKET = 256

log = logging.getLogger(__name__)


def row_bucket(n: int, buckets: tuple[int, ...] = ROW_BUCKETS) -> int | None:
    """The smallest bucket holding n rows; None when n is past the largest."""
    for b in buckets:
        if n <= b:
            return b
    return None


def kv_bucket(max_position: int, n_ctx: int) -> int:
    """Positions a global layer reads for a step whose largest position is max_position: the smallest
    power of two >= MIN_KV_BUCKET past it, at most n_ctx. Few buckets (log2 of n_ctx), so few graphs."""
    need = max_position + 1
    assert 0 < need <= n_ctx, (max_position, n_ctx)
    b = MIN_KV_BUCKET
    while b < need:
        b *= 2
    return min(b, n_ctx)


@dataclass
class _Bucket:
    ids: torch.Tensor          # (rows,) int64, on the device
    positions: torch.Tensor    # (rows,) int64
    slots: torch.Tensor        # (rows,) int64
    logits: torch.Tensor | None = None      # (rows, local_vocab): the output the graph writes
    graph: object | None = None             # torch.cuda.CUDAGraph, or None: run eagerly


StaticStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class DecodeGraphs:
    """Runs qualifying decode steps through fixed-shape buckets (captured as CUDA graphs in mode "cuda")."""

    def __init__(self, step: StaticStep, device: torch.device, n_ctx: int, scratch_slot: int, mode: str,
                 buckets: tuple[int, ...] = ROW_BUCKETS):
        """step(ids, positions, slots, kv_len) -> (rows, local_vocab): the fixed-shape forward."""
        assert mode in ("cuda", "eager"), mode
        self.step, self.device, self.n_ctx, self.scratch_slot = step, device, n_ctx, scratch_slot
        self.mode, self.buckets = mode, buckets
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool = None
        self.captured = 0          # graphs captured (reports and tests)
        self.replays = 0           # steps run through a bucket

    def fits(self, slots: torch.Tensor) -> bool:
        """A step of these (host) slots runs through a bucket: at most the largest bucket, one token per slot."""
        n = slots.numel()
        return 0 < n <= self.buckets[-1] and len(set(slots.tolist())) == n

    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """ids, positions, slots (n,) int64 on the host -> (n, local_vocab) logits of every row (a copy of
        the bucket's output, which the caller may keep)."""
        n = ids.numel()
        rows = row_bucket(n, self.buckets)
        kv_len = kv_bucket(int(positions.max()), self.n_ctx)
        b = self._buckets.get((rows, kv_len))
        fresh = b is None
        if fresh:
            b = self._buckets[rows, kv_len] = _Bucket(*(torch.zeros(rows, dtype=torch.int64, device=self.device)
                                                        for _ in range(3)))
        self._fill(b, n, ids, positions, slots)
        if fresh and self.mode == "cuda":
            self._capture(b, kv_len)      # runs the step once eagerly, then captures it
        elif b.graph is not None:
            b.graph.replay()
        else:
            b.logits = self.step(b.ids, b.positions, b.slots, kv_len)
        self.replays += 1
        return b.logits[:n].clone()       # the next replay overwrites the bucket's output

    def _fill(self, b: _Bucket, n: int, ids, positions, slots) -> None:
        """The step's rows, then padding: token 0 at position 0 of the scratch slot."""
        rows = b.ids.numel()
        pad = rows - n
        for dst, src, fill in ((b.ids, ids, 0), (b.positions, positions, 0), (b.slots, slots, self.scratch_slot)):
            host = src.to(torch.int64) if not pad else torch.cat([src.to(torch.int64),
                                                                  torch.full((pad,), fill, dtype=torch.int64)])
            dst.copy_(host, non_blocking=False)

    def _capture(self, b: _Bucket, kv_len: int) -> None:
        """Run the step once eagerly on a side stream (its result is this step's answer, and the run
        warms up what capture may not do for the first time: allocator pools, library handles), then
        capture the bucket. Capture records without running, so the cache is written once. A capture
        that fails leaves the bucket eager, with one log line: correct, only slower."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            result = self.step(b.ids, b.positions, b.slots, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.step(b.ids, b.positions, b.slots, kv_len)
        except Exception as e:  # noqa: BLE001 - a capture failure is a speed loss, not an error
            log.warning("decode graph for %d rows x %d positions not captured (%s); running it eagerly",
                        b.ids.numel(), kv_len, str(e).splitlines()[0] if str(e) else type(e).__name__)
            b.logits = result
            return
        out.copy_(result)                 # this step's answer; each replay overwrites it
        b.graph, b.logits = graph, out
        self.captured += 1

"""Grouped-query attention over a per-rank KV cache that holds only this rank's KV heads.

The cache has one slot per concurrent sequence. A global layer keeps every position:
(n_global_layers, n_slots, n_ctx, n_local_kv_heads, head_dim) for k and for v. A sliding-window
layer (window w) never reads further back than w - 1 positions, so it keeps a ring of w entries:
position p lives at p % w. A step's own keys are attended to before they are written to the
ring, so a step may hold any number of tokens (a 4k-token prompt chunk against a 512 window).
Positions of a slot must be written from 0 upwards without gaps; `reset` is free because stale
entries (past a sequence's positions, or older than its window) are never read.

`Attention` holds what a rank's heads are (kernels/base.py Heads) and picks the layer's store; the
rank's kernels do the attending (which implementation runs when: kernels/base.py).
"""
from __future__ import annotations

import math

import torch

from ..errors import TensorsplitError
from ..kernels.base import Heads, Kernels
from ..kernels.kv_types import kv_type

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)   # its enable_gqa


def _rings(windows, n_ctx: int) -> tuple[int, ...]:
    """Per layer, the ring size of a sliding layer, or 0 where all n_ctx positions are kept: a
    window as long as the context is no window at all."""
    return tuple(w if 0 < w < n_ctx else 0 for w in windows)


def _stored_slots(n_slots: int, static: bool) -> int:
    """Slots a cache stores: the sequences', and for fixed-shape decode one scratch slot."""
    return n_slots + 1 if static else n_slots


class KVCache:
    def __init__(self, n_layers: int, n_slots: int, n_ctx: int, n_local_kv_heads: int, head_dim: int,
                 device, dtype=torch.float32, windows: tuple[int, ...] | None = None, static: bool = False,
                 v_type=None):
        """dtype: what the keys are stored as (kernels/kv_types.py: a KvType, its name, or a float dtype);
        v_type: the values' (default: the keys'). Blocks of a quantized type are stored as uint8 rows.
        windows: per layer, 0 for a global layer or the sliding window w; default all global.
        static: for fixed-shape decode (decode_graphs.py): one more slot, `scratch_slot`, that the
        padding rows of a bucket write to, and zeroed storage, because fixed-shape attention reads
        positions it masks out and 0 * NaN from uninitialised memory would still poison the sum."""
        windows = tuple(windows or (0,) * n_layers)
        assert len(windows) == n_layers, (len(windows), n_layers)
        self.windows = _rings(windows, n_ctx)
        self.ring = max(self.windows, default=0)   # ring entries per sliding layer (all share one window)
        assert all(w in (0, self.ring) for w in self.windows), self.windows
        # layer -> index in its store
        self.index, n_full, n_ring = [], 0, 0
        for w in self.windows:
            self.index.append(n_ring if w else n_full)
            n_ring, n_full = n_ring + bool(w), n_full + (not w)
        self.k_type, self.v_type = kv_type(dtype), kv_type(v_type if v_type is not None else dtype)
        for t in (self.k_type, self.v_type):
            t.check(head_dim)
        k_tail = (n_local_kv_heads, self.k_type.row_elems(head_dim))
        v_tail = (n_local_kv_heads, self.v_type.row_elems(head_dim))
        kd, vd = self.k_type.dtype, self.v_type.dtype
        # Uninitialised on purpose: attention reads only positions 0..p of a slot, all written before
        # they are read, so pages of unused slots and positions are never touched (nor committed).
        alloc = torch.zeros if static else torch.empty
        n_stored = _stored_slots(n_slots, static)
        self.k = alloc((n_full, n_stored, n_ctx, *k_tail), dtype=kd, device=device)
        self.v = alloc((n_full, n_stored, n_ctx, *v_tail), dtype=vd, device=device)
        self.k_ring = alloc((n_ring, n_stored, self.ring, *k_tail), dtype=kd, device=device)
        self.v_ring = alloc((n_ring, n_stored, self.ring, *v_tail), dtype=vd, device=device)
        self.n_slots, self.n_ctx = n_slots, n_ctx
        self.scratch_slot = n_slots if static else None
        # per layer, (window, k store, v store): its ring for a sliding layer, else its full store. Made
        # once: a view per layer and step would be two more operator calls in every layer of a step
        self.stores = [(w, self.k_ring[i], self.v_ring[i]) if w else (w, self.k[i], self.v[i])
                       for w, i in zip(self.windows, self.index)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_ring, self.v_ring))

    @staticmethod
    def planned_bytes(windows, n_slots: int, n_ctx: int, n_local_kv_heads: int, head_dim: int,
                      types=("f32", "f32"), static: bool = False) -> int:
        """What the cache of these arguments will hold, without allocating it: k and v (of `types`, as
        kv_types.py stores them), a ring of w entries for a sliding layer whose window w is shorter than
        the context; static: with the scratch slot of fixed-shape decode."""
        entries = sum(w or n_ctx for w in _rings(windows, n_ctx))
        row = sum(kv_type(t).row_bytes(head_dim) for t in types)
        return entries * _stored_slots(n_slots, static) * n_local_kv_heads * row

    def check(self, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """User-facing bounds check, once per forward (not per layer)."""
        if positions.numel() and int(positions.max()) >= self.n_ctx:
            raise TensorsplitError(f"position {int(positions.max())} is past the context size {self.n_ctx} "
                                   "(raise -c/--ctx-size)")
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.n_slots):
            raise TensorsplitError(f"sequence slot {int(slots.max())} is outside 0..{self.n_slots - 1}")


class Attention:
    """Attention for the rank's query heads [q0, q1), reading KV heads [k0, k1)."""

    def __init__(self, q_heads: tuple[int, int], kv_heads: tuple[int, int], group_size: int,
                 head_dim: int, kernels: Kernels, scale: float | None = None, q_prescaled: bool = False):
        """q_prescaled: under llama.cpp numerics, q is scaled before its f16 rounding (kernels/base.py Heads)."""
        q0, q1 = q_heads
        k0, _ = kv_heads
        # local query head i reads local KV head kv_of_q[i]: global q head h uses KV head h // group_size
        kv_of_q = torch.tensor([h // group_size - k0 for h in range(q0, q1)], dtype=torch.long, device=kernels.device)
        n_local_heads = q1 - q0
        # When the rank's q heads are whole groups in order (local q head i reads local KV head
        # i // local_group), SDPA's grouped-query mode reads the KV heads in place. A rank holding
        # part of a group (9 heads, 3 KV heads, 4 ranks) copies the KV heads it needs per q head:
        # at 2k positions that copy cost 3x the attention itself (SmolLM2's shapes, 2 cores).
        n_kv = int(kv_of_q.max()) + 1 if q1 > q0 else 1
        local_group = n_local_heads // n_kv
        gqa_in_place = (_SDPA_HAS_GQA and n_local_heads == n_kv * local_group and
                        kv_of_q.tolist() == [i // local_group for i in range(n_local_heads)])
        self.heads = Heads(kv_of_q, n_local_heads, head_dim, scale if scale is not None else 1.0 / math.sqrt(head_dim),
                           q_prescaled, gqa_in_place)
        self.kernels = kernels

    @property
    def gqa_in_place(self) -> bool:
        return self.heads.gqa_in_place

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                 positions: torch.Tensor, slots: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q (n, n_local_heads, hd); k, v (n, n_local_kv_heads, hd) -> (n, n_local_heads * hd): writes
        the step's keys and values into the cache, and attends. Tokens may belong to several slots (a
        batch of sequences); each attends within its own slot, and a slot's tokens in one step have
        consecutive positions. sinks (n_local_heads,): the layer's attention sinks (gpt-oss), or None."""
        window, kc, vc = cache.stores[layer]
        if sinks is None:
            return self.kernels.attend(q, k, v, kc, vc, window, positions, slots, self.heads)
        return self.kernels.attend(q, k, v, kc, vc, window, positions, slots, self.heads, sinks)

    def decode_static(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                      positions: torch.Tensor, slots: torch.Tensor, kv_len: int,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row, each of its own slot, with shapes that depend only on (rows, kv_len) and no
        host synchronisation: what a CUDA graph can hold (decode_graphs.py)."""
        window, kc, vc = cache.stores[layer]
        if sinks is None:
            return self.kernels.attend_static(q, k, v, kc, vc, window, positions, slots, self.heads, kv_len)
        return self.kernels.attend_static(q, k, v, kc, vc, window, positions, slots, self.heads, kv_len, sinks)

"""Grouped-query attention over a per-rank KV cache that holds only this rank's KV heads.

The cache has one slot per concurrent sequence. A global layer keeps every position:
(n_global_layers, n_slots, n_ctx, n_local_kv_heads, head_dim) for k and for v. A sliding-window
layer (window w) never reads further back than w - 1 positions, so it keeps a ring of w entries:
position p lives at p % w. A step's own keys are attended to before they are written to the
ring, so a step may hold any number of tokens (a 4k-token prompt chunk against a 512 window).
Positions of a slot must be written from 0 upwards without gaps; `reset` is free because stale
entries (past a sequence's positions, or older than its window) are never read.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import TensorsplitError
from ..kernels.ops import ops
from .numerics import Numerics, round_f16

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
                 device, dtype=torch.float32, windows: tuple[int, ...] | None = None, static: bool = False):
        """windows: per layer, 0 for a global layer or the sliding window w; default all global.
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
        tail = (n_local_kv_heads, head_dim)
        # Uninitialised on purpose: attention reads only positions 0..p of a slot, all written before
        # they are read, so pages of unused slots and positions are never touched (nor committed).
        alloc = torch.zeros if static else torch.empty
        n_stored = _stored_slots(n_slots, static)
        self.k = alloc((n_full, n_stored, n_ctx, *tail), dtype=dtype, device=device)
        self.v = alloc((n_full, n_stored, n_ctx, *tail), dtype=dtype, device=device)
        self.k_ring = alloc((n_ring, n_stored, self.ring, *tail), dtype=dtype, device=device)
        self.v_ring = alloc((n_ring, n_stored, self.ring, *tail), dtype=dtype, device=device)
        self.n_slots, self.n_ctx = n_slots, n_ctx
        self.scratch_slot = n_slots if static else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_ring, self.v_ring))

    @staticmethod
    def planned_bytes(windows, n_slots: int, n_ctx: int, n_local_kv_heads: int, head_dim: int,
                      elem_bytes: int = 4, static: bool = False) -> int:
        """What the cache of these arguments will hold, without allocating it: k and v, a ring of
        w entries for a sliding layer whose window w is shorter than the context; static: with the
        scratch slot of fixed-shape decode."""
        entries = sum(w or n_ctx for w in _rings(windows, n_ctx))
        return 2 * entries * _stored_slots(n_slots, static) * n_local_kv_heads * head_dim * elem_bytes

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
                 head_dim: int, scale: float | None = None, q_prescaled: bool = False, device="cpu",
                 numerics: Numerics = Numerics(), native: bool = False):
        """q_prescaled: under llama.cpp numerics, q is scaled before its f16 rounding (llama.cpp's
        Gemma and Phi-3 graphs scale q itself), else the scores are (its other graphs: in the softmax).
        native: one native op per layer (kernels/csrc/attention_body.h) instead of torch per slot."""
        q0, q1 = q_heads
        k0, _ = kv_heads
        # local query head i reads local KV head kv_of_q[i]: global q head h uses KV head h // group_size
        self.kv_of_q = torch.tensor([h // group_size - k0 for h in range(q0, q1)], dtype=torch.long, device=device)
        self.n_local_heads, self.head_dim = q1 - q0, head_dim
        # When the rank's q heads are whole groups in order (local q head i reads local KV head
        # i // local_group), SDPA's grouped-query mode reads the KV heads in place. A rank holding
        # part of a group (9 heads, 3 KV heads, 4 ranks) copies the KV heads it needs per q head:
        # at 2k positions that copy cost 3x the attention itself (SmolLM2's shapes, 2 cores).
        n_kv = int(self.kv_of_q.max()) + 1 if q1 > q0 else 1
        local_group = self.n_local_heads // n_kv
        self.gqa_in_place = (_SDPA_HAS_GQA and self.n_local_heads == n_kv * local_group and
                             self.kv_of_q.tolist() == [i // local_group for i in range(self.n_local_heads)])
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self.q_prescaled = q_prescaled
        self.numerics, self.native = numerics, native

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                 positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """q (n, n_local_heads, hd); k, v (n, n_local_kv_heads, hd) -> (n, n_local_heads * hd).

        Tokens may belong to several slots (a batch of sequences); each attends within its own slot,
        and a slot's tokens in one step have consecutive positions.
        """
        window, li = cache.windows[layer], cache.index[layer]
        if self.native:   # writes the step's keys and values into the cache, and attends, in one op
            kc, vc = (cache.k_ring[li], cache.v_ring[li]) if window else (cache.k[li], cache.v[li])
            return ops.attention(q.contiguous(), k.contiguous(), v.contiguous(), kc, vc, positions, slots,
                                 self.kv_of_q, window, self.scale, self.numerics.llamacpp,
                                 self.numerics.llamacpp and not self.q_prescaled)
        if not window:
            cache.k[li, slots, positions] = k.to(cache.k.dtype)
            cache.v[li, slots, positions] = v.to(cache.v.dtype)
        out = torch.empty(q.shape[0], self.n_local_heads, self.head_dim, dtype=q.dtype, device=q.device)
        for slot, idx in _group_by_slot(slots):
            qpos = positions[idx]                                     # (t,) consecutive
            if window:
                keys, vals, kpos = _ring_keys(cache, li, slot, int(qpos[0]), window, k[idx], v[idx], q.dtype)
            else:
                kv_len = int(qpos.max()) + 1
                keys = cache.k[li, slot, :kv_len].to(q.dtype)            # (L, n_local_kv_heads, hd)
                vals = cache.v[li, slot, :kv_len].to(q.dtype)
                kpos = torch.arange(kv_len, device=q.device)
            in_place = self.gqa_in_place and not self.numerics.llamacpp
            if not in_place:
                keys, vals = keys.index_select(1, self.kv_of_q), vals.index_select(1, self.kv_of_q)  # (L, H, hd)
            qh, kh, vh = q[idx].transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1)
            mask = allowed_mask(kpos, qpos, window)                   # (t, L)
            if self.numerics.llamacpp:
                o = _attend_like_llamacpp(qh, kh, vh, mask, self.scale, self.q_prescaled)
            else:
                o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale,
                                                   **({"enable_gqa": True} if in_place else {}))  # (H, t, hd)
            out[idx] = o.transpose(0, 1)
        return out.reshape(q.shape[0], -1)


    def decode_static(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                      positions: torch.Tensor, slots: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One token per row, each of its own slot, with shapes that depend only on (rows, kv_len) and no
        host synchronisation: what a CUDA graph can hold (decode_graphs.py).

        q (n, n_local_heads, hd); k, v (n, n_local_kv_heads, hd) -> (n, n_local_heads * hd).
        A global layer reads the first kv_len positions of each row's slot (kv_len > every position),
        a sliding layer its whole ring, masking what the row may not see. The row's own key is written
        first: for one token that is the order the step-at-a-time path has too."""
        window, li = cache.windows[layer], cache.index[layer]
        n = q.shape[0]
        if window:
            kc, vc = cache.k_ring[li], cache.v_ring[li]
            kc[slots, positions % window] = k.to(kc.dtype)
            vc[slots, positions % window] = v.to(vc.dtype)
            keys, vals = kc[slots], vc[slots]                             # (n, window, n_kv, hd)
            entry = torch.arange(window, device=q.device)
            # ring entry j holds the newest position p <= pos with p % window == j
            kpos = positions[:, None] - torch.remainder(positions[:, None] - entry[None, :], window)
            allowed = kpos >= 0                                           # (n, window)
        else:
            kc, vc = cache.k[li], cache.v[li]
            kc[slots, positions] = k.to(kc.dtype)
            vc[slots, positions] = v.to(vc.dtype)
            keys, vals = kc[slots, :kv_len], vc[slots, :kv_len]           # (n, kv_len, n_kv, hd)
            allowed = torch.arange(kv_len, device=q.device)[None, :] <= positions[:, None]
        kh = keys.index_select(2, self.kv_of_q).transpose(1, 2).to(q.dtype)   # (n, H, L, hd)
        vh = vals.index_select(2, self.kv_of_q).transpose(1, 2).to(q.dtype)
        qh = q[:, :, None, :]                                             # (n, H, 1, hd)
        mask = allowed[:, None, None, :]                                  # (n, 1, 1, L)
        if self.numerics.llamacpp:
            o = _attend_like_llamacpp(qh, kh, vh, mask, self.scale, self.q_prescaled)
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale)
        return o.reshape(n, -1)


def allowed_mask(kpos: torch.Tensor, qpos: torch.Tensor, window: int) -> torch.Tensor:
    """(t, L) bool: query at qpos[i] may read the key at kpos[j] (causal, and within the window)."""
    allowed = kpos[None, :] <= qpos[:, None]
    if window:
        allowed &= kpos[None, :] > qpos[:, None] - window
    return allowed


def _ring_keys(cache: KVCache, li: int, slot: int, p0: int, window: int, k_new, v_new, dtype):
    """Keys and values a sliding layer's step starting at position p0 may read: the ring's entries for
    positions [max(0, p0 - window + 1), p0), then the step's own. Stores the step's last `window`
    entries in the ring afterwards. Returns keys, values (L, n_local_kv_heads, hd) and positions (L,)."""
    device = k_new.device
    past = torch.arange(max(0, p0 - window + 1), p0, device=device)       # (P,)
    new = torch.arange(p0, p0 + k_new.shape[0], device=device)            # (t,)
    keys = torch.cat([cache.k_ring[li, slot, past % window].to(dtype),
                      k_new.to(cache.k_ring.dtype).to(dtype)])            # rounded as the cache stores them
    vals = torch.cat([cache.v_ring[li, slot, past % window].to(dtype), v_new.to(cache.v_ring.dtype).to(dtype)])
    keep = slice(max(0, k_new.shape[0] - window), None)
    cache.k_ring[li, slot, new[keep] % window] = k_new[keep].to(cache.k_ring.dtype)
    cache.v_ring[li, slot, new[keep] % window] = v_new[keep].to(cache.v_ring.dtype)
    return keys, vals, torch.cat([past, new])


def _attend_like_llamacpp(q, k, v, attn_mask, scale, q_prescaled):
    """q (..., H, t, hd), k and v (..., H, L, hd) f16-valued -> (..., H, t, hd), rounding as llama.cpp's CPU path does
    without flash attention: q to f16 for q @ k.T, the probabilities to f16 for p @ v. The scale
    multiplies q before that rounding where llama.cpp's graph scales q (q_prescaled), else the
    float32 scores (ggml_soft_max_ext's scale). Equal when the scale is a power of two."""
    if q_prescaled:
        scores = round_f16(q * scale) @ k.transpose(-1, -2)
    else:
        scores = (round_f16(q) @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    return round_f16(torch.softmax(scores, dim=-1)) @ v


def _group_by_slot(slots: torch.Tensor):
    """Yield (slot, token indices) for each distinct slot, in first-appearance order."""
    if slots.numel() and bool((slots == slots[0]).all()):
        yield int(slots[0]), torch.arange(slots.numel(), device=slots.device)
        return
    for s in torch.unique(slots).tolist():
        yield s, (slots == s).nonzero().squeeze(1)

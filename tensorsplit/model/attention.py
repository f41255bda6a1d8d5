"""Grouped-query attention over a per-rank KV cache that holds only this rank's KV heads.

The cache has one slot per concurrent sequence: k and v are each
(n_layers, n_slots, n_ctx, n_local_kv_heads, head_dim). A token at position p of slot s
writes its k/v at [layer, s, p] and attends to [layer, s, 0..p] (and, with a sliding window
w, only to positions > p - w). Positions of a slot must be written from 0 upwards without gaps;
`reset` is free because stale entries past a sequence's positions are never read.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import TensorsplitError
from . import numerics


class KVCache:
    def __init__(self, n_layers: int, n_slots: int, n_ctx: int, n_local_kv_heads: int, head_dim: int,
                 device, dtype=torch.float32):
        shape = (n_layers, n_slots, n_ctx, n_local_kv_heads, head_dim)
        # Uninitialised on purpose: attention reads only positions 0..p of a slot, all written before
        # they are read, so pages of unused slots and positions are never touched (nor committed).
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.n_slots, self.n_ctx = n_slots, n_ctx

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

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
                 head_dim: int, scale: float | None = None, device="cpu"):
        q0, q1 = q_heads
        k0, _ = kv_heads
        # local query head i reads local KV head kv_of_q[i]: global q head h uses KV head h // group_size
        self.kv_of_q = torch.tensor([h // group_size - k0 for h in range(q0, q1)], dtype=torch.long, device=device)
        self.n_local_heads, self.head_dim = q1 - q0, head_dim
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                 positions: torch.Tensor, slots: torch.Tensor, window: int = 0) -> torch.Tensor:
        """q (n, n_local_heads, hd); k, v (n, n_local_kv_heads, hd) -> (n, n_local_heads * hd).

        Tokens may belong to several slots (a batch of sequences); each attends within its own slot.
        """
        cache.k[layer, slots, positions] = k.to(cache.k.dtype)
        cache.v[layer, slots, positions] = v.to(cache.v.dtype)
        out = torch.empty(q.shape[0], self.n_local_heads, self.head_dim, dtype=q.dtype, device=q.device)
        for slot, idx in _group_by_slot(slots):
            qpos = positions[idx]                                     # (t,)
            kv_len = int(qpos.max()) + 1
            keys = cache.k[layer, slot, :kv_len].index_select(1, self.kv_of_q).to(q.dtype)   # (L, H, hd)
            vals = cache.v[layer, slot, :kv_len].index_select(1, self.kv_of_q).to(q.dtype)
            kpos = torch.arange(kv_len, device=q.device)
            allowed = kpos[None, :] <= qpos[:, None]                  # (t, L) causal
            if window:
                allowed &= kpos[None, :] > qpos[:, None] - window
            attend = _attend_like_llamacpp if numerics.llamacpp() else F.scaled_dot_product_attention
            o = attend(q[idx].transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1),
                       attn_mask=allowed, scale=self.scale)          # (H, t, hd)
            out[idx] = o.transpose(0, 1)
        return out.reshape(q.shape[0], -1)


def _attend_like_llamacpp(q, k, v, attn_mask, scale):
    """q (H, t, hd), k and v (H, L, hd) f16-valued -> (H, t, hd), rounding as llama.cpp's CPU path does
    without flash attention: q to f16 for q @ k.T, the probabilities to f16 for p @ v."""
    scores = (numerics.round_f16(q * scale) @ k.transpose(1, 2)).masked_fill(~attn_mask, float("-inf"))
    return numerics.round_f16(torch.softmax(scores, dim=-1)) @ v


def _group_by_slot(slots: torch.Tensor):
    """Yield (slot, token indices) for each distinct slot, in first-appearance order."""
    if slots.numel() and bool((slots == slots[0]).all()):
        yield int(slots[0]), torch.arange(slots.numel(), device=slots.device)
        return
    for s in torch.unique(slots).tolist():
        yield s, (slots == s).nonzero().squeeze(1)

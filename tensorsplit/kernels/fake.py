"""Fake (meta) implementations of the native ops: output shapes and dtypes without running them, so
torch.compile and other tracers can pass through the custom ops."""
from __future__ import annotations

import torch

from .layout import FORMATS, n_tiles


@torch.library.register_fake("tensorsplit::repack")
def _repack(rows, type, n_cols):
    f = FORMATS[type]
    return rows.new_empty((n_tiles(rows.shape[0]), n_cols // f.block * f.tile_block))


@torch.library.register_fake("tensorsplit::unpack_rows")
def _unpack_rows(tiles, type, n_rows, n_cols, ids):
    f = FORMATS[type]
    return tiles.new_empty((ids.numel(), n_cols // f.block * f.block_bytes))


@torch.library.register_fake("tensorsplit::quantize_act")
def _quantize_act(x, kind, group):
    m, k = x.shape
    return (x.new_empty((m, k), dtype=torch.int8), x.new_empty((m, k // group)), x.new_empty((m, k // group)),
            x.new_empty((m, k // group), dtype=torch.int32))


@torch.library.register_fake("tensorsplit::group_sums")
def _group_sums(x, group):
    return x.new_empty((x.shape[0], x.shape[1] // group))


@torch.library.register_fake("tensorsplit::matmul_q8")
def _matmul_q8(w, type, n_rows, n_cols, q, d, s, isum, wide=False):
    return d.new_empty((q.shape[0], n_rows), dtype=torch.float64 if wide else torch.float32)


@torch.library.register_fake("tensorsplit::matmul_f32")
def _matmul_f32(w, type, n_rows, n_cols, x, xsum, wide=False):
    return x.new_empty((x.shape[0], n_rows), dtype=torch.float64 if wide else torch.float32)


@torch.library.register_fake("tensorsplit::attention")
def _attention(q, k, v, k_cache, v_cache, positions, slots, kv_of_q, window, scale, round16, scale_scores):
    return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))


@torch.library.register_fake("tensorsplit::rms_norm")
def _rms_norm(x, weight, eps):
    return torch.empty_like(x)


@torch.library.register_fake("tensorsplit::rope")
def _rope(x, positions, cos, sin, neox, rope_dim):
    return torch.empty_like(x)


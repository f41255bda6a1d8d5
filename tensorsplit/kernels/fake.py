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
    return x.new_empty((m, k + 12 * (k // group)), dtype=torch.uint8)     # csrc/kernels.h q8_rows


@torch.library.register_fake("tensorsplit::group_sums")
def _group_sums(x, group):
    return x.new_empty((x.shape[0], x.shape[1] // group))


@torch.library.register_fake("tensorsplit::matmul_q8")
def _matmul_q8(w, type, n_rows, n_cols, xq, wide=False):
    return xq.new_empty((xq.shape[0], n_rows), dtype=torch.float64 if wide else torch.float32)


@torch.library.register_fake("tensorsplit::quantize_matmul_q8")
def _quantize_matmul_q8(w, type, n_rows, n_cols, x, kind, group, wide=False):
    m, k = x.shape
    return (x.new_empty((m, n_rows), dtype=torch.float64 if wide else torch.float32),
            x.new_empty((m, k + 12 * (k // group)), dtype=torch.uint8))


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



@torch.library.register_fake("tensorsplit::add_rms_norm")
def _add_rms_norm(x, a, a_weight, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.register_fake("tensorsplit::qkv_heads")
def _qkv_heads(q, k, v, positions, cos, sin, neox, rope_dim, q_norm, k_norm, eps, n_heads, n_kv_heads):
    n, hd = q.shape[0], q.shape[1] // (n_heads if k is not None else n_heads + 2 * n_kv_heads)
    return q.new_empty((n, n_heads, hd)), q.new_empty((n, n_kv_heads, hd)), q.new_empty((n, n_kv_heads, hd))


@torch.library.register_fake("tensorsplit::glu")
def _glu(gate, up, kind, table):
    return gate.new_empty((gate.shape[0], gate.shape[1] if up is not None else gate.shape[1] // 2))

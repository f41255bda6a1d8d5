"""Rotary position embedding, in the two layouts llama.cpp uses.

normal (LLAMA_ROPE_TYPE_NORM): rotates adjacent pairs (x[2i], x[2i+1]); llama.cpp's llama
converter permutes the q/k rows so that this matches the original model.
neox (LLAMA_ROPE_TYPE_NEOX): rotates (x[i], x[i + rope_dim/2]).
Only the first `rope_dim` dims of each head are rotated; the rest pass through.
The angles are the rank's kernels' (their numerics): float64 rounded once, so long positions keep
their precision, or under llamacpp numerics float32 as ggml forms them. The tables are built once
per context; the kernels rotate.
`attn_factor` multiplies cos and sin (ggml's mscale; LongRoPE's scaling factor), so it scales
q.k by its square.
"""
from __future__ import annotations

import torch

from ..kernels.base import Kernels


class Rope:
    def __init__(self, head_dim: int, rope_dim: int, base: float, neox: bool,
                 freq_scale: float = 1.0, freq_factors: torch.Tensor | None = None, attn_factor: float = 1.0):
        assert rope_dim % 2 == 0 and rope_dim <= head_dim, (rope_dim, head_dim)
        self.rope_dim, self.neox, self.attn_factor = rope_dim, neox, attn_factor
        # theta_i = base^(-2i/rope_dim), i < rope_dim/2; llama3-style factors divide it (rope_freqs tensor)
        inv_freq = base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
        if freq_factors is not None:
            assert freq_factors.numel() == rope_dim // 2, (freq_factors.shape, rope_dim)
            inv_freq = inv_freq / freq_factors.to(torch.float64).cpu()
        self.inv_freq = inv_freq * freq_scale  # (rope_dim/2,) float64, on CPU
        self.base, self.freq_scale = base, freq_scale
        self.freq_factors = None if freq_factors is None else freq_factors.to(torch.float32).cpu()

    def build(self, n_positions: int, kernels: Kernels) -> "Rope":
        """Make the cos / sin tables for positions [0, n_positions) on the kernels' device, once (not per
        step), with their angles."""
        angles = kernels.rope_angles(self, torch.arange(n_positions))
        self.cos = (angles.cos() * self.attn_factor).to(kernels.device, torch.float32).contiguous()   # (n_positions, rope_dim/2)
        self.sin = (angles.sin() * self.attn_factor).to(kernels.device, torch.float32).contiguous()
        self.kernels = kernels
        return self

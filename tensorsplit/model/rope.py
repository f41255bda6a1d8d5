"""Rotary position embedding, in the two layouts llama.cpp uses.

normal (LLAMA_ROPE_TYPE_NORM): rotates adjacent pairs (x[2i], x[2i+1]); llama.cpp's llama
converter permutes the q/k rows so that this matches the original model.
neox (LLAMA_ROPE_TYPE_NEOX): rotates (x[i], x[i + rope_dim/2]).
Only the first `rope_dim` dims of each head are rotated; the rest pass through.
Angles are computed in float64 and rounded once, so long positions keep their precision
(under llamacpp numerics, in float32 as ggml computes them: theta_i = theta_{i-1} * base^(-2/d)).
`attn_factor` multiplies cos and sin (ggml's mscale; LongRoPE's scaling factor), so it scales
q.k by its square.
"""
from __future__ import annotations

import torch

from ..kernels.ops import ops

from .numerics import Numerics


class Rope:
    def __init__(self, head_dim: int, rope_dim: int, base: float, neox: bool,
                 freq_scale: float = 1.0, freq_factors: torch.Tensor | None = None, attn_factor: float = 1.0,
                 numerics: Numerics = Numerics()):
        assert rope_dim % 2 == 0 and rope_dim <= head_dim, (rope_dim, head_dim)
        self.rope_dim, self.neox, self.attn_factor, self.numerics = rope_dim, neox, attn_factor, numerics
        # theta_i = base^(-2i/rope_dim), i < rope_dim/2; llama3-style factors divide it (rope_freqs tensor)
        inv_freq = base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
        if freq_factors is not None:
            assert freq_factors.numel() == rope_dim // 2, (freq_factors.shape, rope_dim)
            inv_freq = inv_freq / freq_factors.to(torch.float64).cpu()
        self.inv_freq = inv_freq * freq_scale  # (rope_dim/2,) float64, on CPU
        self.base, self.freq_scale = base, freq_scale
        self.freq_factors = None if freq_factors is None else freq_factors.to(torch.float32).cpu()

    def build(self, n_positions: int, device, native: bool) -> "Rope":
        """Make the cos / sin tables for positions [0, n_positions) on `device`, once (not per step);
        native: rotate with the native op (CPU)."""
        positions = torch.arange(n_positions)
        angles = (self._angles_like_ggml(positions) if self.numerics.llamacpp
                  else positions.to(torch.float64)[:, None] * self.inv_freq[None, :])
        self.cos = (angles.cos() * self.attn_factor).to(device, torch.float32).contiguous()   # (n_positions, rope_dim/2)
        self.sin = (angles.sin() * self.attn_factor).to(device, torch.float32).contiguous()
        self.native = native
        return self

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (n, heads, head_dim), positions (n,) -> rotated copy."""
        if self.native:
            return ops.rope(x, positions, self.cos, self.sin, self.neox, self.rope_dim)
        return self.apply(x, self.cos[positions][:, None, :], self.sin[positions][:, None, :])

    def _angles_like_ggml(self, positions: torch.Tensor) -> torch.Tensor:
        """(n, rope_dim/2) angles as ggml_rope_cache_init forms them, each float32 product rounded."""
        step = torch.tensor(self.base, dtype=torch.float32) ** torch.tensor(-2.0 / self.rope_dim, dtype=torch.float32)
        scale = torch.tensor(self.freq_scale, dtype=torch.float32)
        theta = positions.to("cpu", torch.float32)
        cols = []
        for i in range(self.rope_dim // 2):
            ff = 1.0 if self.freq_factors is None else self.freq_factors[i]
            cols.append(theta / ff * scale)
            theta = theta * step
        return torch.stack(cols, dim=-1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (n, heads, head_dim), cos and sin (n, 1, rope_dim/2) -> rotated copy (the torch path)."""
        d = self.rope_dim
        rot, rest = x[..., :d], x[..., d:]
        if self.neox:
            a, b = rot[..., : d // 2], rot[..., d // 2:]
            out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

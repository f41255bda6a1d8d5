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
YaRN (ggml's rope_yarn; ext_factor 1 as llama.cpp sets it for yarn files, or --yarn-ext-factor): dimension
pair i turns at freq_scale * theta_i * (1 - mix_i) + theta_i * mix_i, where mix_i ramps from ext_factor
(fast dims, extrapolated) to 0 (slow dims, interpolated) between the correction dims of beta_fast and
beta_slow; cos and sin are multiplied by 1 + 0.1 ln(factor) (llama.cpp cancels its own get_mscale against
that, leaving rope.scaling.attn_factor times this: config.py RopeScaling.mscale).
"""
from __future__ import annotations

import math

import torch

from ..kernels.base import Kernels


def yarn_mix(rope_dim: int, base: float, n_ctx_orig: int, beta_fast: float, beta_slow: float,
             ext_factor: float = 1.0) -> list[float]:
    """Per dimension pair i < rope_dim/2, YaRN's extrapolation weight (ggml_rope_yarn_corr_dims and
    rope_yarn_ramp, times ext_factor)."""
    def corr_dim(n_rot: float) -> float:
        return rope_dim * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    low = max(0.0, math.floor(corr_dim(beta_fast)))
    high = min(rope_dim - 1.0, math.ceil(corr_dim(beta_slow)))
    return [(1.0 - min(1.0, max(0.0, (i - low) / max(0.001, high - low)))) * ext_factor for i in range(rope_dim // 2)]


class Rope:
    def __init__(self, head_dim: int, rope_dim: int, base: float, neox: bool,
                 freq_scale: float = 1.0, freq_factors: torch.Tensor | None = None, attn_factor: float = 1.0,
                 yarn: tuple[int, float, float, float] | None = None):
        """yarn: (original context, beta_fast, beta_slow, ext_factor) for YaRN's ramp, with freq_scale =
        1 / factor. attn_factor: what cos and sin are multiplied by, whole (config.py RopeScaling.mscale)."""
        assert rope_dim % 2 == 0 and rope_dim <= head_dim, (rope_dim, head_dim)
        self.rope_dim, self.neox = rope_dim, neox
        # theta_i = base^(-2i/rope_dim), i < rope_dim/2; llama3-style factors divide it (rope_freqs tensor)
        inv_freq = base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
        if freq_factors is not None:
            assert freq_factors.numel() == rope_dim // 2, (freq_factors.shape, rope_dim)
            inv_freq = inv_freq / freq_factors.to(torch.float64).cpu()
        self.yarn_mix = None if yarn is None else yarn_mix(rope_dim, base, *yarn)
        if self.yarn_mix is None:
            self.inv_freq = inv_freq * freq_scale  # (rope_dim/2,) float64, on CPU
        else:
            mix = torch.tensor(self.yarn_mix, dtype=torch.float64)
            self.inv_freq = inv_freq * (freq_scale * (1 - mix) + mix)
        self.attn_factor = attn_factor
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

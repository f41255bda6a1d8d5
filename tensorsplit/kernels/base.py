"""What the model computes with: one `Kernels` object per rank, chosen once (choice.py) for the rank's
device and the world's numerics, and handed to the model when it is built. The model never asks
which kernels run or which arithmetic they use; it calls these.

    load(w)                       a QWeight in the layout these kernels multiply (CPU: 16-row tiles)
    fuse_rows(ws)                 ws' rows stacked into one weight that one matmul reads (q | k | v,
                                  gate | up), or None where these kernels keep them apart
    matmul(x, w, wide=False)      x (..., n_cols) @ W.T -> (..., n_rows) float32 (wide: float64)
    get_rows(w, ids)              rows `ids` of w, dequantized (the embedding lookup)
    pack_experts(gate, up, down, gate_bias=None, up_bias=None)
                                  a mixture-of-experts layer's experts as these kernels hold them
                                  (ExpertWeights)
    experts(x, experts, selected, weights, glu)
                                  a mixture-of-experts FFN's weighted sum over each token's experts
    rms_norm(x, weight, eps)      x * rsqrt(mean(x^2) + eps) * weight, over the last dim
    add_rms_norm(x, a, weight, eps, a_weight=None)
                                  the residual add and the next norm: (s, rms_norm(s, weight)),
                                  s = x + a as float32 (or + rms_norm(a, a_weight): Gemma's post-norms)
    rope(x, positions, cos, sin, neox, rope_dim)          the rotary embedding, tables given
    qkv_heads(q, k, v, heads, positions, rope, q_norm, k_norm, eps)
                                  a step's projections (n, H * hd) ... as heads (n, H, hd): q and k
                                  normed per head (q_norm) and rotated (model/rope.py Rope); k and v
                                  None: q is the fused projection q | k | v
    glu(gate, up, name)           act(gate) * up, the gated FFN's activation; up None: gate is gate | up;
                                  "swiglu_oai": gpt-oss's clamped SwiGLU
    attend(q, k, v, k_cache, v_cache, window, positions, slots, heads, sinks=None)
                                  write the step's keys and values, and attend: any step (sinks:
                                  gpt-oss's per-head logits that join the softmax's sum)
    attend_static(..., kv_len)    the same for a fixed-shape decode step with no host sync (the
                                  buckets decode_graphs.py captures as CUDA graphs)
    activation(name), rope_angles(rope, positions), kv_dtype
                                  the rest of the arithmetic the numerics decide
    name, path(w)                 what they are, and what a matmul over w counts as (counting.py)

The implementations, and which attention runs when:
    TorchKernels  (torch_kernels.py)   the reference: dequantized tiles, torch ops, attention one
                                       slot at a time (SDPA, or llama.cpp's roundings). Any device.
    NativeKernels (native_kernels.py)  C++ ops on a CPU (csrc/): integer block dots, one fused
                                       attention op per layer for every slot at once.
    TritonKernels (triton_kernels.py)  Triton matmuls on CUDA / ROCm (gpu/); the rest is the reference's.
attend_static is the reference's fixed-shape attention in all three: only decode buckets call it.
Each implementation is built for one numerics (numerics.py) and settles every choice that depends on
it in its constructor; nothing on the hot path reads a global.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .quants.qweight import QWeight


class MatmulInput:
    """A matmul input x (..., K) that several weights multiply (q, k, v; gate, up): each form a
    weight's kernel needs (8-bit blocks of a kind, per-group sums, a rounded copy) is made once, by
    the kernels, and kept here (`forms`)."""
    __slots__ = ("lead", "n_cols", "x2", "forms")

    def __init__(self, x: torch.Tensor):
        self.lead, self.n_cols = x.shape[:-1], x.shape[-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])                 # (M, K); each call skipped
        if x2.dtype != torch.float32:                                         # where it has nothing to do
            x2 = x2.float()                                                   # (a few us each, every matmul)
        self.x2 = x2 if x2.is_contiguous() else x2.contiguous()
        self.forms: dict = {}

    @staticmethod
    def of(x: "torch.Tensor | MatmulInput") -> "MatmulInput":
        return x if isinstance(x, MatmulInput) else MatmulInput(x)

    def rows(self, idx: torch.Tensor) -> "MatmulInput":
        """The input of rows idx (t,), with the rows of every form already made (forms are per row):
        a mixture-of-experts layer quantizes each token once for all the experts it is routed to."""
        sub = MatmulInput.__new__(MatmulInput)
        sub.lead, sub.n_cols = (idx.numel(),), self.n_cols
        sub.x2 = self.x2.index_select(0, idx)
        sub.forms = {key: (tuple(t.index_select(0, idx) for t in form) if isinstance(form, tuple)
                           else form.index_select(0, idx)) for key, form in self.forms.items()}
        return sub

    def check(self, w: QWeight) -> None:
        if self.n_cols != w.n_cols:
            raise ValueError(f"{w.name}: input has {self.n_cols} features, weight expects {w.n_cols}")

    def shaped(self, y: torch.Tensor) -> torch.Tensor:
        """y (M, n_rows) back to x's leading shape."""
        return y if len(self.lead) == 1 else y.reshape(*self.lead, y.shape[-1])


@dataclass
class ExpertWeights:
    """A mixture-of-experts layer's experts on one rank: per expert its rows of gate and up and columns of
    down (None where the rank holds none of that expert), and gpt-oss's per-expert gate and up biases of
    those rows. `fused` is the kernels' own form of them for one call per step (NativeKernels), or None."""
    gate: list
    up: list
    down: list
    gate_bias: list | None = None
    up_bias: list | None = None
    fused: object = None


@dataclass(frozen=True)
class Heads:
    """How a rank's query heads read its KV heads, for attention.

    kv_of_q (n_local_heads,) long: local query head i reads local KV head kv_of_q[i].
    gqa_in_place: the q heads are whole groups in order (i reads i // local_group), so SDPA's
      grouped-query mode can read the KV heads without copying them per q head.
    q_prescaled: under llama.cpp's numerics, q is scaled before its f16 rounding (llama.cpp's Gemma
      and Phi-3 graphs scale q itself); else the scores are (its other graphs: in the softmax)."""
    kv_of_q: torch.Tensor
    n_local_heads: int
    head_dim: int
    scale: float
    q_prescaled: bool
    gqa_in_place: bool


class Kernels(Protocol):
    name: str                # "native", "triton" or "torch"
    device: torch.device
    kv_dtype: torch.dtype    # what the KV cache stores

    def load(self, w: QWeight) -> QWeight: ...

    def fuse_rows(self, ws: list[QWeight]) -> QWeight | None: ...

    def matmul(self, x: "torch.Tensor | MatmulInput", w: QWeight, wide: bool = False) -> torch.Tensor: ...

    def get_rows(self, w: QWeight, ids: torch.Tensor) -> torch.Tensor: ...

    def pack_experts(self, gate: list, up: list, down: list, gate_bias: list | None = None,
                     up_bias: list | None = None) -> ExpertWeights: ...

    def experts(self, x, experts: ExpertWeights, selected: torch.Tensor, weights: torch.Tensor,
                glu: str) -> torch.Tensor: ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm(self, x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float,
                     a_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rope(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             neox: bool, rope_dim: int) -> torch.Tensor: ...

    def qkv_heads(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, heads: tuple[int, int],
                  positions: torch.Tensor, rope, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def glu(self, gate: torch.Tensor, up: torch.Tensor | None, name: str) -> torch.Tensor: ...

    def attend(self, q, k, v, k_cache, v_cache, window: int, positions, slots, heads: Heads,
               sinks: torch.Tensor | None = None) -> torch.Tensor: ...

    def attend_static(self, q, k, v, k_cache, v_cache, window: int, positions, slots, heads: Heads,
                      kv_len: int, sinks: torch.Tensor | None = None) -> torch.Tensor: ...

    def activation(self, name: str): ...

    def rope_angles(self, rope, positions: torch.Tensor) -> torch.Tensor: ...

    def path(self, w: QWeight) -> str | None: ...

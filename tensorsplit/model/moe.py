"""A mixture-of-experts FFN under tensor parallelism (llama.cpp's build_moe_ffn, split Megatron-style).

Per token: the router (mirrored on every rank) gives logits over the experts; softmax; the top
n_expert_used experts by probability (ties: the lower expert id first); their probabilities as
weights, divided by their sum where the arch says so (MoeSpec.norm_weights; the sum clamped at
6.1e-5 as ggml clamps it). Every expert is split as a dense FFN is: each rank holds the same rows of
gate/up and columns of down of every expert (shard_plan.py), computes its partial of each selected
expert's output, weights and sums them in float64, and one all-reduce completes the layer, as after
a dense FFN. Every rank routes alike from the same mirrored input and weights: no broadcast.

qwen2moe adds a shared expert, split the same way, scaled by sigmoid(ffn_gate_inp_shexp . x).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.base import Kernels, MatmulInput
from ..kernels.quants import QWeight
from .arch import MoeSpec
from .layers import Reduce

WEIGHT_SUM_MIN = 6.103515625e-5     # ggml_clamp of the weights' sum in build_moe_ffn (norm_w)


@dataclass
class SharedExpert:
    gate_inp: torch.Tensor     # (n_embd,) float32: the shared expert's scalar gate
    gate: QWeight              # (local_ff_shexp, n_embd)
    up: QWeight
    down: QWeight              # (n_embd, local_ff_shexp)


class MoE:
    def __init__(self, router: QWeight | torch.Tensor, gate: list[QWeight], up: list[QWeight], down: list[QWeight],
                 n_used: int, spec: MoeSpec, act, reduce: Reduce, kernels: Kernels,
                 shared: SharedExpert | None = None):
        """router: float64 (n_expert, n_embd) for an F32 router (loader.load_router), else a weight."""
        assert len(gate) == len(up) == len(down) == router.shape[0], (len(gate), router.shape)
        self.router, self.gate, self.up, self.down = router, gate, up, down
        self.n_used, self.norm_weights = n_used, spec.norm_weights
        self.act, self.reduce, self.kernels, self.shared = act, reduce, kernels, shared

    def route(self, inp: MatmulInput) -> tuple[torch.Tensor, torch.Tensor]:
        """-> selected (n, n_used) long, weights (n, n_used) float32."""
        # the logits summed wide and rounded once: the same bits whatever the batch (a float32 BLAS sums a
        # gemm and a gemv in different orders), the thread count or the device, so every rank routes alike
        if isinstance(self.router, torch.Tensor):
            logits = (inp.x2.double() @ self.router.T).float()                           # (n, n_expert)
        else:
            logits = self.kernels.matmul(inp, self.router, wide=True).float()
        probs = torch.softmax(logits, dim=-1)
        ranked = torch.sort(probs, dim=-1, descending=True, stable=True)
        weights, selected = ranked.values[:, :self.n_used], ranked.indices[:, :self.n_used]
        if self.norm_weights:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=WEIGHT_SUM_MIN)
        return selected, weights

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h (n, n_embd), the same on every rank -> (n, n_embd) float32, summed over ranks."""
        inp = MatmulInput(h)                      # quantized once for the router and the shared expert
        selected, weights = self.route(inp)
        y = self.kernels.experts(inp, self.gate, self.up, self.down, selected, weights, self.act)
        if self.shared is not None:
            sh = self.shared
            part = self.kernels.matmul(self.act(self.kernels.matmul(inp, sh.gate)) * self.kernels.matmul(inp, sh.up),
                                       sh.down, wide=True)                     # (n, n_embd) float64
            gate = torch.sigmoid((inp.x2.double() @ sh.gate_inp.double()).float())     # (n,), batch-independent
            y = y + part * gate.to(torch.float64)[:, None]
        return self.reduce(y).float()

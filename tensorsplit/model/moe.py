"""A mixture-of-experts FFN under tensor parallelism (llama.cpp's build_moe_ffn, split Megatron-style).

Per token: the router (mirrored on every rank) gives logits over the experts; softmax; the top
n_expert_used experts by probability (ties: the lower expert id first); their probabilities as
weights, divided by their sum where the arch says so (MoeSpec.norm_weights; the sum clamped at
6.1e-5 as ggml clamps it). Every expert is split as a dense FFN is: each rank holds the same rows of
gate/up and columns of down of every expert (shard_plan.py), computes its partial of each selected
expert's output, weights and sums them in float64, and one all-reduce completes the layer, as after
a dense FFN. Every rank routes alike from the same mirrored input and weights: no broadcast.

qwen2moe adds a shared expert, split the same way, scaled by sigmoid(ffn_gate_inp_shexp . x).

gpt-oss (MoeSpec gating "softmax_weight"): the router has a bias; the top experts are picked by logit
and weighted by a softmax over their logits; each expert's gate and up rows have biases (split with
the rows), its down output a bias, added once after the all-reduce as sum_j w_j b_down[e_j]; the
activation is SwiGLU-OAI: min(g, 7) * sigmoid(1.702 min(g, 7)) * (clamp(u, -7, 7) + 1) (ggml_swiglu_oai).
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
class ExpertBiases:
    """gpt-oss: per expert this rank's rows of the gate and up biases (None where it holds none of
    the expert), and every expert's down bias, (n_expert, n_embd) float32 (mirrored)."""
    gate: list
    up: list
    down: torch.Tensor


@dataclass
class SharedExpert:
    gate_inp: torch.Tensor     # (n_embd,) float32: the shared expert's scalar gate
    gate: QWeight              # (local_ff_shexp, n_embd)
    up: QWeight
    down: QWeight              # (n_embd, local_ff_shexp)


class MoE:
    def __init__(self, router: QWeight | torch.Tensor, gate: list[QWeight], up: list[QWeight], down: list[QWeight],
                 n_used: int, spec: MoeSpec, activation: str, reduce: Reduce, kernels: Kernels,
                 shared: SharedExpert | None = None, router_bias: torch.Tensor | None = None,
                 biases: ExpertBiases | None = None):
        """router: float64 (n_expert, n_embd) for an F32 router (loader.load_router), else a weight.
        activation: the arch's ("silu"), for act(gate) * up (kernels.glu), unless the spec names the
        experts' own ("swiglu_oai")."""
        assert len(gate) == len(up) == len(down) == router.shape[0], (len(gate), router.shape)
        self.router = router
        self.experts = kernels.pack_experts(gate, up, down, *((biases.gate, biases.up) if biases else ()))
        self.n_used, self.norm_weights, self.gating = n_used, spec.norm_weights, spec.gating
        self.router_bias = router_bias
        self.down_bias = None if biases is None else biases.down     # (n_expert, n_embd); gate/up: in experts
        self.activation, self.glu = activation, spec.activation or activation
        self.reduce, self.kernels, self.shared = reduce, kernels, shared

    def route(self, inp: MatmulInput) -> tuple[torch.Tensor, torch.Tensor]:
        """-> selected (n, n_used) long, weights (n, n_used) float32."""
        # the logits summed wide and rounded once: the same bits whatever the batch (a float32 BLAS sums a
        # gemm and a gemv in different orders), the thread count or the device, so every rank routes alike
        if isinstance(self.router, torch.Tensor):
            logits = (inp.x2.double() @ self.router.T).float()                           # (n, n_expert)
        else:
            logits = self.kernels.matmul(inp, self.router, wide=True).float()
        if self.router_bias is not None:
            logits = logits + self.router_bias
        if self.gating == "softmax_weight":            # the top logits, weighted by their own softmax
            ranked = torch.sort(logits, dim=-1, descending=True, stable=True)
            selected = ranked.indices[:, :self.n_used]
            weights = torch.softmax(ranked.values[:, :self.n_used], dim=-1)
        else:
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
        y = self.kernels.experts(inp, self.experts, selected, weights, self.glu)
        if self.shared is not None:
            sh = self.shared
            part = self.kernels.matmul(self.kernels.glu(self.kernels.matmul(inp, sh.gate),
                                                        self.kernels.matmul(inp, sh.up), self.activation),
                                       sh.down, wide=True)                     # (n, n_embd) float64
            gate = torch.sigmoid((inp.x2.double() @ sh.gate_inp.double()).float())     # (n,), batch-independent
            y = y + part * gate.to(torch.float64)[:, None]
        y = self.reduce(y)
        if self.down_bias is not None:                # sum_j w_j b_down[e_j], once, after the sum over ranks
            # the chosen rows widened, not the whole table each step
            y = y + (weights.double()[:, :, None] * self.down_bias[selected].double()).sum(1)
        return y.float()

"""NativeKernels: the Kernels (base.py) of a CPU rank, on the native C++ ops (csrc/, built and loaded by
kernels.native()). One op per matmul, straight from the weight's blocks in the tiled layout
(16 rows interleaved, csrc/layout.h; QWeight.to_tiles):

    numerics llamacpp: the input is quantized to 8 bits once per MatmulInput (so q/k/v and gate/up
      share it), as llama.cpp quantizes it, and multiplied with the codes in integers;
    numerics exact: float input, the weights decoded in registers, float sums.

A mixture of experts' FFN is one op per layer (csrc/experts.cpp): each token's experts read from the
step's tensors, so a decode step has no Python decision in it and can be replayed (model/step_program.py),
and a prompt's tokens are grouped by expert in C++ (each expert a GEMM over its tokens), with the
reference's per-row arithmetic.

Attention is one op per layer for every slot of the step (csrc/attention_body.h): it writes the
step's keys and values into the cache and attends. rms_norm and rope are one op each. What the tiled
layout does not hold (dense F32 weights, a weight a test built in GGUF layout) and the fixed-shape
decode attention are the reference's (torch_kernels.py).
"""
from __future__ import annotations

import torch

from .base import ExpertWeights, Heads, MatmulInput
from .layout import FORMATS, TILE_ROWS
from .numerics import Numerics
from .quants.dequant import dequantize
from .quants.qweight import QWeight
from .torch_kernels import TorchKernels

_GLU_KINDS = {"silu": 0, "swiglu_oai": 2}    # csrc/glu.h GluKind; gelu by table: 1


class NativeKernels(TorchKernels):
    name = "native"

    def __init__(self, numerics: Numerics):
        super().__init__(numerics, "cpu")
        ops = torch.ops.tensorsplit    # loaded by kernels.native(); each op's overload looked up once here,
        # which skips the per-call overload resolution (about a microsecond, some twenty calls per layer)
        self._matmul_q8, self._matmul_f32 = ops.matmul_q8.default, ops.matmul_f32.default
        self._quantize_act, self._group_sums = ops.quantize_act.default, ops.group_sums.default
        self._quantize_matmul_q8 = ops.quantize_matmul_q8.default
        self._unpack_rows, self._rms_norm, self._rope = ops.unpack_rows.default, ops.rms_norm.default, ops.rope.default
        self._attention, self._add_rms_norm = ops.attention.default, ops.add_rms_norm.default
        self._qkv_heads, self._glu = ops.qkv_heads.default, ops.glu.default
        self._experts = ops.experts.default
        # GELU as ggml takes it under llama.cpp's numerics: a table over the f16 inputs, made by the
        # reference's function, so that the op's values are the reference's bit for bit
        self._gelu_table = None
        if numerics.llamacpp:
            halves = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
            self._gelu_table = self.activation("gelu_tanh")(halves).contiguous()
        llamacpp = numerics.llamacpp
        self._integer = llamacpp           # block weights: integer dots on 8-bit inputs, else float inputs
        self._block_matmul = self._integer_matmul if llamacpp else self._float_matmul
        self._round16 = llamacpp           # the attention op rounds q and the probabilities to f16

    def load(self, w: QWeight) -> QWeight:
        """The tiled layout where the type has one (the GGUF copy is freed: a rank holds one copy)."""
        return w.to_tiles() if int(w.qtype) in FORMATS else w

    def fuse_rows(self, ws: list[QWeight]) -> QWeight | None:
        """ws stacked into one tiled weight where they share a type and every one but the last fills whole
        tiles (its rows then start a tile of their own): one matmul call instead of len(ws), with the same
        rows and so the same results; None where ws cannot be stacked."""
        if len({w.qtype for w in ws}) != 1 or len({w.n_cols for w in ws}) != 1 or \
                any(w.layout != "tiles" for w in ws) or any(w.n_rows % TILE_ROWS for w in ws[:-1]):
            return None
        return QWeight(torch.cat([w.data for w in ws]), ws[0].qtype, sum(w.n_rows for w in ws), ws[0].n_cols,
                       " | ".join(w.name for w in ws), "tiles")

    def path(self, w: QWeight) -> str | None:
        return self.name if w.layout == "tiles" else super().path(w)

    def matmul(self, x, w: QWeight, wide: bool = False) -> torch.Tensor:
        k = w.kernel
        if k is None:                                       # not tiled: the reference's
            return super().matmul(x, w, wide)
        inp = MatmulInput.of(x)
        inp.check(w)
        if k.act is None:                                   # F16 / BF16: float arithmetic on the rounded input
            y = self._matmul_f32(w.data, k.type_id, w.n_rows, w.n_cols, self.rounded(inp, w.qtype), None, wide)
        else:
            y = self._block_matmul(inp, w, wide)
        return inp.shaped(y)

    def prepare(self, inp: MatmulInput, w: QWeight) -> None:
        k = w.kernel
        if k is None or k.act is None:
            super().prepare(inp, w)
        elif self._integer:
            self._q8(inp, k)
        else:
            self._sums(inp, k)

    def _q8(self, inp: MatmulInput, k):
        """llama.cpp's Q8_0 / Q8_1 / Q8_K of x, kept on inp: (M, row bytes) uint8, each row its codes and
        per-group scales and sums (csrc/kernels.h q8_rows)."""
        key = (k.act, k.group)
        q8 = inp.forms.get(key)
        if q8 is None:
            q8 = inp.forms[key] = self._quantize_act(inp.x2, k.act, k.group)
        return q8

    def _sums(self, inp: MatmulInput, k):
        """Per-group sums of x (M, K / group), for the min term; None for a format without one."""
        if not k.has_min:
            return None
        key = ("sums", k.group)
        sums = inp.forms.get(key)
        if sums is None:
            sums = inp.forms[key] = self._group_sums(inp.x2, k.group)
        return sums

    def _integer_matmul(self, inp: MatmulInput, w: QWeight, wide: bool) -> torch.Tensor:
        k = w.kernel
        key = (k.act, k.group)
        q8 = inp.forms.get(key)
        if q8 is not None:
            return self._matmul_q8(w.data, k.type_id, w.n_rows, w.n_cols, q8, wide)
        # the input's first weight of this kind quantizes it in the same call (one op call fewer per
        # matmul input in a decode step), and leaves the quantized rows to the others
        y, inp.forms[key] = self._quantize_matmul_q8(w.data, k.type_id, w.n_rows, w.n_cols, inp.x2, k.act, k.group,
                                                     wide)
        return y

    def _float_matmul(self, inp: MatmulInput, w: QWeight, wide: bool) -> torch.Tensor:
        k = w.kernel
        return self._matmul_f32(w.data, k.type_id, w.n_rows, w.n_cols, inp.x2, self._sums(inp, k), wide)

    def get_rows(self, w: QWeight, ids: torch.Tensor) -> torch.Tensor:
        if w.layout != "tiles":
            return super().get_rows(w, ids)
        flat = ids.reshape(-1).to(dtype=torch.long)
        raw = self._unpack_rows(w.data, int(w.qtype), w.n_rows, w.n_cols, flat)     # GGUF bytes of those rows
        return dequantize(raw, w.qtype, w.n_cols, w.name).reshape(*ids.shape, w.n_cols)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """In one op, the sum of squares in double as ggml takes it."""
        return self._rms_norm(x, weight, eps)

    def add_rms_norm(self, x, a, weight, eps: float, a_weight=None):
        """The residual add, the rounding of a float64 sum and the norms, in one op."""
        if x.dim() != 2 or not x.is_contiguous() or not a.is_contiguous():
            return super().add_rms_norm(x, a, weight, eps, a_weight)
        return self._add_rms_norm(x, a, a_weight, weight, eps)

    def qkv_heads(self, q, k, v, heads: tuple[int, int], positions, rope, q_norm, k_norm, eps: float):
        return self._qkv_heads(q, k, v, positions, rope.cos, rope.sin, rope.neox, rope.rope_dim, q_norm, k_norm, eps,
                               *heads)

    def glu(self, gate, up, name: str):
        if name in _GLU_KINDS:
            return self._glu(gate, up, _GLU_KINDS[name], None)
        if name == "gelu_tanh" and self._gelu_table is not None:
            return self._glu(gate, up, 1, self._gelu_table)
        return super().glu(gate, up, name)

    def pack_experts(self, gate: list, up: list, down: list, gate_bias: list | None = None,
                     up_bias: list | None = None) -> ExpertWeights:
        """The experts, and where every held one is tiled with a kernel for these numerics, their tiles as
        the experts op takes them: tensor lists with an empty tensor for an expert this rank does not
        hold, each expert's rows, and the three types."""
        ew = super().pack_experts(gate, up, down, gate_bias, up_bias)
        held = [e for e, g in enumerate(gate) if g is not None]
        if not held:
            return ew
        types = [gate[held[0]].qtype, up[held[0]].qtype, down[held[0]].qtype]
        for ws, t in zip((gate, up, down), types):
            if any(ws[e].layout != "tiles" or ws[e].qtype != t or ws[e].kernel is None or
                   (self._integer and ws[e].kernel.act is None) for e in held):
                return ew
        empty = torch.empty(0, dtype=torch.uint8)
        no_bias = torch.empty(0, dtype=torch.float32)

        def tiles(ws):
            return [empty if w is None else w.data for w in ws]
        biases = ([], []) if gate_bias is None else tuple([no_bias if b is None else b.contiguous() for b in bs]
                                                          for bs in (gate_bias, up_bias))
        rows = [0 if g is None else g.n_rows for g in gate]
        ew.fused = (tiles(gate), tiles(up), tiles(down), rows, down[held[0]].n_rows, [int(t) for t in types], *biases)
        return ew

    def experts(self, x, experts: ExpertWeights, selected, weights, glu: str) -> torch.Tensor:
        inp = MatmulInput.of(x)
        if experts.fused is None or glu not in _GLU_KINDS:
            return super().experts(inp, experts, selected, weights, glu)
        gate, up, down, rows, n_out, types, gate_bias, up_bias = experts.fused
        return self._experts(inp.x2, gate, up, down, rows, n_out, types, selected, weights, _GLU_KINDS[glu], None,
                             gate_bias, up_bias, self._integer)

    def rope(self, x, positions, cos, sin, neox: bool, rope_dim: int) -> torch.Tensor:
        return self._rope(x, positions, cos, sin, neox, rope_dim)

    def attend(self, q, k, v, k_cache, v_cache, window: int, positions, slots, heads: Heads,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        return self._attention(q.contiguous(), k.contiguous(), v.contiguous(), k_cache, v_cache, positions, slots,
                               heads.kv_of_q, window, heads.scale, self._round16,
                               self._round16 and not heads.q_prescaled, sinks)

"""TorchKernels: the reference implementation of the Kernels (base.py), in torch ops on any device.

It is what runs where no faster kernel does (a CPU without the native kernels, mps, xpu, a CUDA
machine without Triton), what the other two inherit for what they do not do themselves, and what
their tests compare with. Weights stay in GGUF blocks; a matmul dequantizes a bounded tile of rows
at a time (TILE_ELEMS) to float32 and multiplies, its input rounded as llama.cpp's CPU backend rounds
it under llamacpp numerics (quants/activations.py), so every device sees the same inputs.

Attention goes one slot at a time, with the slot's keys gathered from the cache: SDPA in exact
numerics, llama.cpp's f16 roundings in llamacpp numerics. The fixed-shape form (attend_static)
gathers every row's keys at once, with a mask, and no host sync.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .base import ExpertWeights, Heads, MatmulInput
from .numerics import Numerics
from .kv_types import KV_TYPES, decode, encode, k_rotation, rotate, round_trip, type_of, v_rotation
from .quants.activations import ROUNDING_KIND, round_inputs
from .quants.dequant import dequantize
from .quants.qtypes import QType
from .quants.qweight import QWeight

# Most weight elements dequantized at once (one tile of whole rows): 4M float32 = 16 MiB of scratch.
# Tests shrink it with monkeypatch to exercise multi-tile paths.
TILE_ELEMS = 1 << 22


class TorchKernels:
    name = "torch"

    def __init__(self, numerics: Numerics, device="cpu", label: str = "torch"):
        """label: what a quantized matmul here counts as (counting.py): "torch", or "native:fallback" /
        "triton:fallback" where faster kernels were wanted on this device but could not load."""
        self.numerics, self.device, self.label = numerics, torch.device(device), label
        llamacpp = numerics.llamacpp
        # every choice the numerics make, made here once
        self.kv_dtype = numerics.kv_dtype
        self._round_inputs = round_inputs if llamacpp else None
        self._attend_math = attend_like_llamacpp if llamacpp else attend_sdpa
        self._gqa_in_place = not llamacpp       # SDPA reads grouped KV heads in place; the f16 path copies
        self._angles = angles_like_ggml if llamacpp else angles_exact
        self._activations = {"silu": F.silu,
                             "gelu_tanh": gelu_tanh_like_ggml if llamacpp else partial(F.gelu, approximate="tanh")}

    # --- weights and matmuls

    def load(self, w: QWeight) -> QWeight:
        return w.to(self.device)

    def fuse_rows(self, ws: list[QWeight]) -> QWeight | None:
        """None: the reference multiplies each weight on its own (one matmul call costs it nothing
        next to its dequantization)."""
        return None

    def path(self, w: QWeight) -> str | None:
        """Dense F32 weights are multiplied as they are (ggml does too): not counted."""
        return None if w.data.dtype == torch.float32 else self.label

    def prepare(self, inp: MatmulInput, w: QWeight) -> None:
        """Make the forms of inp that a matmul over w reads (experts() then shares them)."""
        self.rounded(inp, w.qtype)

    def rounded(self, inp: MatmulInput, qtype) -> torch.Tensor:
        """x as a llamacpp-numerics matmul against qtype sees it (F32 weights: as it is), kept on inp."""
        if self._round_inputs is None or qtype == QType.F32:
            return inp.x2
        key = ("rounded", ROUNDING_KIND[qtype])
        form = inp.forms.get(key)
        if form is None:
            form = inp.forms[key] = self._round_inputs(inp.x2, qtype)
        return form

    def matmul(self, x, w: QWeight, wide: bool = False) -> torch.Tensor:
        """y = x @ W.T: x (..., n_cols) -> (..., n_rows) float32, or float64 with `wide` (a row-parallel
        partial sum is kept wide through the all-reduce and rounded once after)."""
        inp = MatmulInput.of(x)
        inp.check(w)
        if w.data.dtype == torch.float32:                     # dense F32: ggml multiplies in float32 too
            y = inp.x2.double() @ w.data.double().T if wide else inp.x2 @ w.data.T
        else:
            y = _tiled(self.rounded(inp, w.qtype), w, wide)
        return inp.shaped(y)

    def get_rows(self, w: QWeight, ids: torch.Tensor) -> torch.Tensor:
        """Dequantize only rows `ids` of w: ids (any shape) -> (*ids.shape, n_cols) float32."""
        flat = ids.reshape(-1).to(device=w.data.device, dtype=torch.long)
        rows = dequantize(w.data.index_select(0, flat), w.qtype, w.n_cols, w.name)
        return rows.reshape(*ids.shape, w.n_cols)

    def pack_experts(self, gate: list, up: list, down: list, gate_bias: list | None = None,
                     up_bias: list | None = None) -> ExpertWeights:
        return ExpertWeights(gate, up, down, gate_bias, up_bias)

    def experts(self, x, experts: ExpertWeights, selected: torch.Tensor, weights: torch.Tensor,
                glu: str) -> torch.Tensor:
        """A mixture-of-experts FFN's partial sum on this rank, before the all-reduce:
        out[t] = sum_j weights[t, j] * down_e(glu(gate_e(x[t]) + bg_e, up_e(x[t]) + bu_e)), e = selected[t, j]
        (self.glu(g, u, glu); the biases bg, bu only where experts has them).

        x (n, n_embd) or MatmulInput; experts: per expert, this rank's rows / columns of it (None where
        the rank holds none of that expert: it adds nothing here);
        selected (n, k) long, weights (n, k) float32 -> (n, n_embd) float64 (the partials are summed
        wide, as a row-parallel layer's are). The tokens are grouped by expert and each expert runs
        once over its tokens (a gemm in a prompt, a gemv in a decode step); an expert no token chose
        is not read. Each row's input is rounded as in a dense matmul (per row, so the same in a group
        as alone)."""
        inp = MatmulInput.of(x)
        gate, up, down = experts.gate, experts.up, experts.down
        biases = None if experts.gate_bias is None else (experts.gate_bias, experts.up_bias)
        held = [e for e, g in enumerate(gate) if g is not None]
        out = torch.zeros(inp.x2.shape[0], inp.n_cols, dtype=torch.float64, device=inp.x2.device)
        if not held:
            return out
        self.prepare(inp, gate[held[0]])            # each token's input forms made once, for every expert
        self.prepare(inp, up[held[0]])
        if inp.x2.shape[0] == 1:                                    # a decode step: no grouping to do
            for w, e in sorted(zip(weights[0].tolist(), selected[0].tolist()), key=lambda we: we[1]):
                if gate[e] is None:
                    continue
                out += self._ffn(inp, gate[e], up[e], down[e], glu, _bias(biases, e)) * w   # as below, in expert order
            return out
        for e in torch.unique(selected).tolist():
            if gate[e] is None:
                continue
            tok, slot = (selected == e).nonzero(as_tuple=True)            # tokens routed to e, in order
            xe = inp.rows(tok)
            y = self._ffn(xe, gate[e], up[e], down[e], glu, _bias(biases, e))     # (t, n_out) float64
            out.index_add_(0, tok, y * weights[tok, slot].to(torch.float64)[:, None])
        return out

    def _ffn(self, x, gate: QWeight, up: QWeight, down: QWeight, glu: str, bias=None) -> torch.Tensor:
        """One expert over x: down(glu(gate(x), up(x))), the down partial summed wide: (t, n_out) float64.
        bias: (gate bias, up bias) of the expert's rows, or None."""
        g, u = self.matmul(x, gate), self.matmul(x, up)
        if bias is not None:
            g, u = g + bias[0], u + bias[1]
        return self.matmul(self.glu(g, u, glu), down, wide=True)

    # --- the rest of a layer

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x (..., d) * rsqrt(mean(x^2) + eps) * weight (d,)."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def add_rms_norm(self, x, a, weight, eps: float, a_weight=None):
        """(s, rms_norm(s, weight)) for s = x + a (a rounded to float32 first: a row-parallel sum arrives
        float64), or s = x + rms_norm(a, a_weight) where the architecture norms the branch (Gemma)."""
        a = a.float()
        if a_weight is not None:
            a = self.rms_norm(a, a_weight, eps)
        s = x + a
        return s, self.rms_norm(s, weight, eps)

    def qkv_heads(self, q, k, v, heads: tuple[int, int], positions, rope, q_norm, k_norm, eps: float):
        """q (n, H * hd), k and v (n, KH * hd), heads (H, KH) -> q (n, H, hd), k and v (n, KH, hd): q and
        k normed per head where q_norm is given, then rotated by `rope` (model/rope.py) at `positions`.
        k and v None: q is one fused projection (n, (H + 2 KH) * hd), q | k | v."""
        n, (n_heads, n_kv_heads) = q.shape[0], heads
        if k is None:
            hd = q.shape[1] // (n_heads + 2 * n_kv_heads)
            q, k, v = q.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], -1)
        q, k, v = q.reshape(n, n_heads, -1), k.reshape(n, n_kv_heads, -1), v.reshape(n, n_kv_heads, -1)
        if q_norm is not None:
            q, k = self.rms_norm(q, q_norm, eps), self.rms_norm(k, k_norm, eps)
        return (self.rope(q, positions, rope.cos, rope.sin, rope.neox, rope.rope_dim),
                self.rope(k, positions, rope.cos, rope.sin, rope.neox, rope.rope_dim), v)

    def glu(self, gate, up, name: str):
        """act(gate) * up, (n, ff); up None: gate is (n, 2 ff), gate | up (a fused projection).
        "swiglu_oai": gpt-oss's min(g, 7) * sigmoid(1.702 min(g, 7)) * (clamp(u, -7, 7) + 1)."""
        if up is None:
            gate, up = gate.chunk(2, dim=-1)
        if name == "swiglu_oai":
            return swiglu_oai(gate, up)
        return self.activation(name)(gate) * up

    def activation(self, name: str):
        """The FFN activation `name` ("silu" or "gelu_tanh") as this arithmetic computes it."""
        return self._activations[name]

    def rope_angles(self, rope, positions: torch.Tensor) -> torch.Tensor:
        """(n, rope_dim/2) rotation angles of `positions` for a model/rope.py Rope."""
        return self._angles(rope, positions)

    def rope(self, x, positions, cos, sin, neox: bool, rope_dim: int) -> torch.Tensor:
        """x (n, heads, head_dim) rotated by the angles of positions (n,); cos, sin (n_ctx, rope_dim/2)
        tables. Only the first rope_dim dims of each head turn. neox: pairs (x[i], x[i + d/2]), else
        adjacent pairs (x[2i], x[2i+1])."""
        cos, sin = cos[positions][:, None, :], sin[positions][:, None, :]      # (n, 1, rope_dim/2)
        d = rope_dim
        rot, rest = x[..., :d], x[..., d:]
        if neox:
            a, b = rot[..., : d // 2], rot[..., d // 2:]
            out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    # --- attention

    def attend(self, q, k, v, k_cache, v_cache, window: int, positions, slots, heads: Heads,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q (n, n_local_heads, hd); k, v (n, n_local_kv_heads, hd) -> (n, n_local_heads * hd).
        sinks (n_local_heads,) float32 or None: per head a logit that joins the softmax and reads no value
        (gpt-oss's attention sinks).

        k_cache, v_cache: this layer's store, (n_stored_slots, n_ctx, n_kv, hd), or for a sliding layer
        its ring (n_stored_slots, window, n_kv, hd) where position p lives at p % window. Tokens may
        belong to several slots; a slot's tokens in one step have consecutive positions and attend
        within their slot. A sliding layer's step attends to its own keys before they are written to
        the ring, so a step may hold more tokens than the window."""
        hd = heads.head_dim
        kt, vt = type_of(k_cache, hd), type_of(v_cache, hd)
        kr, vr = k_rotation(kt, hd), v_rotation(vt, hd)       # a quantized cache's rotations (kv_types.py)
        q, k, v = rotate(q, kr), rotate(k, kr), rotate(v, vr)
        if not window:
            k_cache[slots, positions] = encode(k, kt)
            v_cache[slots, positions] = encode(v, vt)
        out = torch.empty(q.shape[0], heads.n_local_heads, heads.head_dim, dtype=q.dtype, device=q.device)
        in_place = heads.gqa_in_place and self._gqa_in_place and sinks is None
        attend_math = self._math_for(kt, sinks)
        for slot, idx in _group_by_slot(slots):
            qpos = positions[idx]                                     # (t,) consecutive
            if window:
                keys, vals, kpos = _ring_keys(k_cache, v_cache, slot, int(qpos[0]), window, k[idx], v[idx], q.dtype,
                                              (kt, vt))
            else:
                kv_len = int(qpos.max()) + 1
                keys = decode(k_cache[slot, :kv_len], kt, hd, q.dtype)   # (L, n_local_kv_heads, hd)
                vals = decode(v_cache[slot, :kv_len], vt, hd, q.dtype)
                kpos = torch.arange(kv_len, device=q.device)
            if not in_place:
                keys, vals = keys.index_select(1, heads.kv_of_q), vals.index_select(1, heads.kv_of_q)  # (L, H, hd)
            qh, kh, vh = q[idx].transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1)
            mask = allowed_mask(kpos, qpos, window)                   # (t, L)
            out[idx] = attend_math(qh, kh, vh, mask, heads, in_place).transpose(0, 1)
        return rotate(out, vr).reshape(q.shape[0], -1)

    def _math_for(self, kt, sinks):
        """The attention arithmetic for keys of type kt: under llamacpp numerics with q8_0 / q4_0 keys, q is
        quantized to q8_0 for the scores, as llama.cpp's flash attention does (the native op's integer dots)."""
        extra = {} if sinks is None else {"sinks": sinks}
        if self._attend_math is attend_like_llamacpp and kt.quantized:
            extra["round_q"] = partial(round_trip, t=KV_TYPES["q8_0"])
        return partial(self._attend_math, **extra) if extra else self._attend_math

    def attend_static(self, q, k, v, k_cache, v_cache, window: int, positions, slots, heads: Heads,
                      kv_len: int, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row, each of its own slot, with shapes that depend only on (rows, kv_len) and no
        host synchronisation: what a CUDA graph can hold (model/decode_graphs.py).

        A global layer reads the first kv_len positions of each row's slot (kv_len > every position),
        a sliding layer its whole ring, masking what the row may not see. The row's own key is written
        first: for one token that is the order attend() has too."""
        n, hd = q.shape[0], heads.head_dim
        kt, vt = type_of(k_cache, hd), type_of(v_cache, hd)
        kr, vr = k_rotation(kt, hd), v_rotation(vt, hd)
        q, k, v = rotate(q, kr), rotate(k, kr), rotate(v, vr)
        if window:
            k_cache[slots, positions % window] = encode(k, kt)
            v_cache[slots, positions % window] = encode(v, vt)
            keys, vals = k_cache[slots], v_cache[slots]                   # (n, window, n_kv, row)
            entry = torch.arange(window, device=q.device)
            # ring entry j holds the newest position p <= pos with p % window == j
            kpos = positions[:, None] - torch.remainder(positions[:, None] - entry[None, :], window)
            allowed = kpos >= 0                                           # (n, window)
        else:
            k_cache[slots, positions] = encode(k, kt)
            v_cache[slots, positions] = encode(v, vt)
            keys, vals = k_cache[slots, :kv_len], v_cache[slots, :kv_len]   # (n, kv_len, n_kv, row)
            allowed = torch.arange(kv_len, device=q.device)[None, :] <= positions[:, None]
        kh = decode(keys.index_select(2, heads.kv_of_q), kt, hd, q.dtype).transpose(1, 2)   # (n, H, L, hd)
        vh = decode(vals.index_select(2, heads.kv_of_q), vt, hd, q.dtype).transpose(1, 2)
        qh = q[:, :, None, :]                                             # (n, H, 1, hd)
        mask = allowed[:, None, None, :]                                  # (n, 1, 1, L)
        out = self._math_for(kt, sinks)(qh, kh, vh, mask, heads, False)           # (n, H, 1, hd)
        return rotate(out, vr).reshape(n, -1)


def _bias(biases, e: int):
    """Expert e's (gate bias, up bias), or None."""
    return None if biases is None else (biases[0][e], biases[1][e])


def _tiled(x2: torch.Tensor, w: QWeight, wide: bool = False) -> torch.Tensor:
    """Dequantize at most TILE_ELEMS weight elements (whole rows) at a time; never the whole matrix
    when it is larger than one tile. wide: the products summed in float64 (row-parallel partials)."""
    dtype = torch.float64 if wide else torch.float32
    out = torch.empty(x2.shape[0], w.n_rows, dtype=dtype, device=x2.device)  # (M, n_rows)
    x2 = x2.to(dtype)
    step = max(1, TILE_ELEMS // max(1, w.n_cols))            # rows per tile
    for r0 in range(0, w.n_rows, step):
        r1 = min(r0 + step, w.n_rows)
        tile = dequantize(w.data[r0:r1], w.qtype, w.n_cols, w.name)  # (r1 - r0, n_cols)
        out[:, r0:r1] = x2 @ tile.to(dtype).T
    return out


OAI_ALPHA, OAI_LIMIT = 1.702, 7.0    # llama.cpp's build_moe_ffn constants for LLM_FFN_SWIGLU_OAI_MOE


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gpt-oss's gated activation, in float32 as ggml_swiglu_oai computes it."""
    x = gate.clamp(max=OAI_LIMIT)
    return x / (1.0 + torch.exp(-OAI_ALPHA * x)) * (up.clamp(-OAI_LIMIT, OAI_LIMIT) + 1.0)


def round_f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().to(x.dtype)


def gelu_tanh_like_ggml(x: torch.Tensor) -> torch.Tensor:
    """ggml_vec_gelu_f32 with GGML_GELU_FP16: table[f16(x)] as f16 for -10 < x < 10, else 0 or x."""
    y = round_f16(F.gelu(round_f16(x), approximate="tanh"))
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))


def angles_exact(rope, positions: torch.Tensor) -> torch.Tensor:
    """(n, rope_dim/2) float64 angles, rounded once when the tables are made."""
    return positions.to(torch.float64)[:, None] * rope.inv_freq[None, :]


def angles_like_ggml(rope, positions: torch.Tensor) -> torch.Tensor:
    """(n, rope_dim/2) angles as ggml_rope_cache_init forms them, each float32 product rounded:
    theta_i = theta_{i-1} * base^(-2/d)."""
    step = torch.tensor(rope.base, dtype=torch.float32) ** torch.tensor(-2.0 / rope.rope_dim, dtype=torch.float32)
    scale = torch.tensor(rope.freq_scale, dtype=torch.float32)
    theta = positions.to("cpu", torch.float32)
    cols = []
    for i in range(rope.rope_dim // 2):
        ff = 1.0 if rope.freq_factors is None else rope.freq_factors[i]
        extrap = theta / ff
        interp = extrap * scale
        if rope.yarn_mix is None:
            cols.append(interp)
        else:                                          # rope_yarn: interp * (1 - mix) + extrap * mix, in float32
            mix = torch.tensor(rope.yarn_mix[i], dtype=torch.float32)
            cols.append(interp * (1 - mix) + extrap * mix)
        theta = theta * step
    return torch.stack(cols, dim=-1)


def attend_sdpa(q, k, v, attn_mask, heads: Heads, in_place: bool, sinks: torch.Tensor | None = None):
    """q (..., H, t, hd), k and v (..., H or n_kv, L, hd) -> (..., H, t, hd), in float32 (torch's SDPA;
    with sinks (H,), the same arithmetic written out, as SDPA has no sinks)."""
    if sinks is not None:
        assert not in_place
        scores = ((q @ k.transpose(-1, -2)) * heads.scale).masked_fill(~attn_mask, float("-inf"))
        return softmax_with_sinks(scores, sinks) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=heads.scale,
                                          **({"enable_gqa": True} if in_place else {}))


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dim of scores (..., H, t, L), where each head h's sink logit sinks[h] joins
    the max and the sum as one more column that no value is read for (ggml_soft_max_add_sinks)."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    col = sinks.to(scores.dtype)[:, None, None].expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, col], dim=-1), dim=-1)[..., :-1]


def attend_like_llamacpp(q, k, v, attn_mask, heads: Heads, in_place: bool = False,
                         sinks: torch.Tensor | None = None, round_q=None):
    """q (..., H, t, hd), k and v (..., H, L, hd) f16-valued -> (..., H, t, hd), rounding as llama.cpp's CPU
    path does without flash attention: q to f16 for q @ k.T (or by round_q), the probabilities to f16 for
    p @ v. The scale multiplies q before that rounding where llama.cpp's graph scales q
    (heads.q_prescaled), else the float32 scores (ggml_soft_max_ext's scale). Equal when the scale is a
    power of two."""
    assert not in_place
    round_q = round_q or round_f16
    if heads.q_prescaled:
        scores = round_q(q * heads.scale) @ k.transpose(-1, -2)
    else:
        scores = (round_q(q) @ k.transpose(-1, -2)) * heads.scale
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    return round_f16(softmax_with_sinks(scores, sinks)) @ v


def allowed_mask(kpos: torch.Tensor, qpos: torch.Tensor, window: int) -> torch.Tensor:
    """(t, L) bool: query at qpos[i] may read the key at kpos[j] (causal, and within the window)."""
    allowed = kpos[None, :] <= qpos[:, None]
    if window:
        allowed &= kpos[None, :] > qpos[:, None] - window
    return allowed


def _ring_keys(k_ring, v_ring, slot: int, p0: int, window: int, k_new, v_new, dtype, types):
    """Keys and values a sliding layer's step starting at position p0 may read: the ring's entries for
    positions [max(0, p0 - window + 1), p0), then the step's own. Stores the step's last `window`
    entries in the ring afterwards. Returns keys, values (L, n_local_kv_heads, hd) and positions (L,).
    types: the rings' (KvType of k, of v)."""
    device, hd = k_new.device, k_new.shape[-1]
    kt, vt = types
    past = torch.arange(max(0, p0 - window + 1), p0, device=device)       # (P,)
    new = torch.arange(p0, p0 + k_new.shape[0], device=device)            # (t,)
    keys = torch.cat([decode(k_ring[slot, past % window], kt, hd, dtype),
                      round_trip(k_new, kt).to(dtype)])                   # rounded as the cache stores them
    vals = torch.cat([decode(v_ring[slot, past % window], vt, hd, dtype), round_trip(v_new, vt).to(dtype)])
    keep = slice(max(0, k_new.shape[0] - window), None)
    k_ring[slot, new[keep] % window] = encode(k_new[keep], kt)
    v_ring[slot, new[keep] % window] = encode(v_new[keep], vt)
    return keys, vals, torch.cat([past, new])


def _group_by_slot(slots: torch.Tensor):
    """Yield (slot, token indices) for each distinct slot, in first-appearance order."""
    if slots.numel() and bool((slots == slots[0]).all()):
        yield int(slots[0]), torch.arange(slots.numel(), device=slots.device)
        return
    for s in torch.unique(slots).tolist():
        yield s, (slots == s).nonzero().squeeze(1)

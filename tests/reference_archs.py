"""Plain dense float64 forwards of Qwen2, Qwen3, Phi-3 and Gemma 3, and of the mixture-of-experts
Qwen3-MoE, Qwen2-MoE and Mixtral, written from the published architectures (the Hugging Face
modeling files' math), independent of tensorsplit.

Mixture of experts (HF Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock):
softmax of the router's logits, the top-k experts, their probabilities renormalised to sum 1
(norm_topk_prob: Qwen3-MoE and Mixtral yes, Qwen2-MoE no), each expert a SwiGLU MLP, the weighted
sum; Qwen2-MoE adds sigmoid(shared_expert_gate(x)) * shared_expert(x). Mixtral is the llama
architecture: the converter permutes its q/k rows for llama.cpp's normal rope layout, so rope
rotates adjacent pairs here (equal to HF's rotate_half on the unpermuted weights).

Weights come from gguf-py's GGUFReader and numpy dequantization. Rope is HF's rotate_half on
the original weight layout: llama.cpp's converter leaves these four families' q/k rows
unpermuted (they use the NeoX layout), so nothing is undone. Fused weights are split here with
numpy: Phi-3's qkv_proj rows are [q; k; v] and gate_up_proj rows [gate; up] (HF: chunk(2)).
One GGUF convention is taken as given: for Gemma the converter stores every RMSNorm weight
as 1 + w, so HF's x * (1 + w) is x * stored here.
gpt-oss (HF GptOssAttention, GptOssMLP): biased q/k/v/o; a learned sink logit per head joins each
softmax row and is dropped after; even layers sliding; YaRN rope (HF _compute_yarn_parameters with
the correction range truncated to whole dims, as the GGUF carries no `truncate` flag and llama.cpp
always truncates); the router's top-k logits (biased) softmaxed as weights; experts with biased
gate/up (the converter de-interleaves HF's gate_up_proj), clamped gate (max 7) and up (+-7),
glu = gate * sigmoid(1.702 gate), out = (up + 1) * glu, biased down. The FFN's norm is the file's
post_attention_norm (HF post_attention_layernorm).
To keep memory sane on a 262k vocabulary, embedding rows are dequantized only where looked up,
and the output layer in blocks of rows.
"""
from __future__ import annotations

import math

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

FAMILIES = ("qwen2", "qwen3", "phi3", "gemma3", "qwen3moe", "qwen2moe", "llama", "gpt-oss")
NORM_TOPK = {"qwen3moe": True, "qwen2moe": False, "llama": True}


class DenseModel:
    def __init__(self, path):
        self.r = GGUFReader(str(path))
        self.t = {t.name: t for t in self.r.tensors}
        f = self.r.fields
        self.arch = arch = bytes(f["general.architecture"].parts[-1]).decode()
        assert arch in FAMILIES, arch
        kv = lambda k, d=None: (f[f"{arch}.{k}"].contents() if f"{arch}.{k}" in f else d)  # noqa: E731
        self.n_layers = kv("block_count")
        self.n_embd = kv("embedding_length")
        self.n_heads = kv("attention.head_count")
        self.n_kv = kv("attention.head_count_kv", self.n_heads)
        self.hd = kv("attention.key_length", self.n_embd // self.n_heads)
        self.rot = kv("rope.dimension_count", self.hd)
        self.base = kv("rope.freq_base", 10000.0)
        self.eps = kv("attention.layer_norm_rms_epsilon")
        # Gemma 3 (HF Gemma3TextConfig): layer i is sliding unless (i + 1) % 6 == 0; sliding layers use
        # rope_local_base_freq 10000; scores scaled by query_pre_attn_scalar ** -0.5 (= head_dim here)
        self.window = kv("attention.sliding_window", 0) if arch in ("gemma3", "gpt-oss") else 0
        self.local_base = 10000.0
        # Phi-3 LongRoPE: factors chosen by context length, cos/sin times the attention factor
        self.attn_factor = kv("rope.scaling.attn_factor", 1.0)
        self.orig_ctx = kv("rope.scaling.original_context_length", kv("context_length"))
        self.n_used = kv("expert_used_count", 0)
        self.yarn = None
        if kv("rope.scaling.type") == "yarn":
            self.yarn = (kv("rope.scaling.factor"), kv("rope.scaling.original_context_length"))

    def w(self, name) -> np.ndarray:
        t = self.t[name]
        return dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64).reshape(
            [int(d) for d in reversed(t.shape)])   # torch order: (out, in)

    def rows(self, name, ids) -> np.ndarray:
        """Dequantize only rows `ids` of a 2-D weight."""
        t = self.t[name]
        raw = np.asarray(t.data).reshape(int(t.shape[1]), -1)[np.asarray(ids)]
        return dequantize(raw, t.tensor_type).astype(np.float64).reshape(len(ids), int(t.shape[0]))

    def rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos, base, factors=None, scale=1.0):
        """x (n, heads, hd): rotate_half on the first `rot` dims, HF style."""
        d, half = self.rot, self.rot // 2
        inv = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
        if factors is not None:
            inv = inv / factors
        if self.yarn is not None:             # HF's YaRN: interpolated slow dims, extrapolated fast ones
            factor, orig = self.yarn
            dim_of = lambda rot: d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
            low, high = max(math.floor(dim_of(32.0)), 0), min(math.ceil(dim_of(1.0)), d - 1)
            extrap = 1 - np.clip((np.arange(half) - low) / (high - low), 0, 1)
            inv = inv / factor * (1 - extrap) + inv * extrap
            scale = scale * (0.1 * math.log(factor) + 1.0)
        ang = pos[:, None] * inv[None, :]
        cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :] * scale
        sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :] * scale
        xr, rest = x[..., :d], x[..., d:]
        if self.arch == "llama":          # adjacent pairs (x[2i], x[2i+1]): the permuted rows' layout
            c, s_ = np.cos(ang)[:, None, :] * scale, np.sin(ang)[:, None, :] * scale
            a, b = xr[..., 0::2], xr[..., 1::2]
            out = np.stack([a * c - b * s_, a * s_ + b * c], -1).reshape(xr.shape)
            return np.concatenate([out, rest], -1)
        rot = np.concatenate([-xr[..., half:], xr[..., :half]], -1)
        return np.concatenate([xr * cos + rot * sin, rest], -1)

    @staticmethod
    def swiglu(h, gate_w, up_w, down_w):
        gate, up = h @ gate_w.T, h @ up_w.T
        return (gate / (1 + np.exp(-gate)) * up) @ down_w.T

    def moe_gpt_oss(self, h, p) -> np.ndarray:
        logits = h @ self.w(p + "ffn_gate_inp.weight").T + self.w(p + "ffn_gate_inp.bias")     # (n, E)
        top = np.argsort(-logits, axis=-1, kind="stable")[:, :self.n_used]
        weights = np.exp(np.take_along_axis(logits, top, -1) - np.take_along_axis(logits, top[:, :1], -1))
        weights /= weights.sum(-1, keepdims=True)
        (gate, up, down), (gb, ub, db) = ([self.w(p + f"ffn_{t}_exps.{kind}") for t in ("gate", "up", "down")]
                                          for kind in ("weight", "bias"))
        out = np.zeros_like(h)
        for t in range(h.shape[0]):
            for j, e in enumerate(top[t]):
                g = np.minimum(h[t] @ gate[e].T + gb[e], 7.0)
                u = np.clip(h[t] @ up[e].T + ub[e], -7.0, 7.0)
                out[t] += weights[t, j] * (((u + 1) * g / (1 + np.exp(-1.702 * g))) @ down[e].T + db[e])
        return out

    def moe(self, h, p) -> np.ndarray:
        """h (n, n_embd) -> the experts' weighted sum (n, n_embd)."""
        if self.arch == "gpt-oss":
            return self.moe_gpt_oss(h, p)
        logits = h @ self.w(p + "ffn_gate_inp.weight").T                    # (n, E)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :self.n_used]   # (n, k)
        weights = np.take_along_axis(probs, top, -1)
        if NORM_TOPK[self.arch]:
            weights = weights / weights.sum(-1, keepdims=True)
        gate, up, down = (self.w(p + f"ffn_{t}_exps.weight") for t in ("gate", "up", "down"))   # (E, out, in)
        out = np.zeros_like(h)
        for t in range(h.shape[0]):
            for j, e in enumerate(top[t]):
                out[t] += weights[t, j] * self.swiglu(h[t:t + 1], gate[e], up[e], down[e])[0]
        if p + "ffn_gate_inp_shexp.weight" in self.t:
            shared = self.swiglu(h, *(self.w(p + f"ffn_{t}_shexp.weight") for t in ("gate", "up", "down")))
            out += shared / (1 + np.exp(-(h @ self.w(p + "ffn_gate_inp_shexp.weight"))))[:, None]
        return out

    def is_sliding(self, i) -> bool:
        return (self.arch == "gemma3" and (i + 1) % 6 != 0) or (self.arch == "gpt-oss" and i % 2 == 0)

    def logits(self, ids, n_ctx: int = 64) -> np.ndarray:
        """ids (n,) one sequence from position 0 -> (n, vocab) float64. n_ctx: the context size
        the model runs with (Phi-3 LongRoPE picks its factors by it)."""
        ids = np.asarray(ids)
        n, hd, H, K = len(ids), self.hd, self.n_heads, self.n_kv
        pos = np.arange(n, dtype=np.float64)
        x = self.rows("token_embd.weight", ids)
        if self.arch == "gemma3":
            x = x * math.sqrt(self.n_embd)
        factors, scale = None, 1.0
        if "rope_factors_long.weight" in self.t:
            kind = "long" if n_ctx > self.orig_ctx else "short"
            factors, scale = self.w(f"rope_factors_{kind}.weight"), self.attn_factor
        qpos, kpos = np.arange(n)[:, None], np.arange(n)[None, :]
        for i in range(self.n_layers):
            p = f"blk.{i}."
            h = self.rms(x, self.w(p + "attn_norm.weight"))
            if p + "attn_qkv.weight" in self.t:
                qkv = h @ self.w(p + "attn_qkv.weight").T
                q, k, v = np.split(qkv, [H * hd, H * hd + K * hd], axis=-1)
            else:
                q, k, v = (h @ self.w(p + f"attn_{t}.weight").T for t in "qkv")
            if self.arch in ("qwen2", "qwen2moe", "gpt-oss"):
                q, k, v = (y + self.w(p + f"attn_{t}.bias") for y, t in zip((q, k, v), "qkv"))
            q, k, v = q.reshape(n, H, hd), k.reshape(n, K, hd), v.reshape(n, K, hd)
            if self.arch in ("qwen3", "gemma3", "qwen3moe"):
                q, k = self.rms(q, self.w(p + "attn_q_norm.weight")), self.rms(k, self.w(p + "attn_k_norm.weight"))
            base = self.local_base if self.is_sliding(i) and self.arch == "gemma3" else self.base
            q, k = self.rope(q, pos, base, factors, scale), self.rope(k, pos, base, factors, scale)
            k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)      # (n, H, hd)
            mask = kpos <= qpos
            if self.is_sliding(i):
                mask &= qpos - kpos < self.window
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
            s = np.where(mask[None], s, -np.inf)
            if p + "attn_sinks.weight" in self.t:       # one more column per head, dropped after the softmax
                sink = np.broadcast_to(self.w(p + "attn_sinks.weight")[:, None, None], (H, n, 1))
                s = np.concatenate([s, sink], -1)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            s = s[..., :n]
            a = np.einsum("hqk,khd->qhd", s, v).reshape(n, -1) @ self.w(p + "attn_output.weight").T
            if p + "attn_output.bias" in self.t:
                a = a + self.w(p + "attn_output.bias")
            if self.arch == "gemma3":
                a = self.rms(a, self.w(p + "post_attention_norm.weight"))
            x = x + a
            h = self.rms(x, self.w(p + ("post_attention_norm.weight" if self.arch == "gpt-oss" else "ffn_norm.weight")))
            if p + "ffn_gate_inp.weight" in self.t:
                x = x + self.moe(h, p)
                continue
            if self.arch == "phi3":
                gate, up = np.split(h @ self.w(p + "ffn_up.weight").T, 2, axis=-1)
            else:
                gate, up = h @ self.w(p + "ffn_gate.weight").T, h @ self.w(p + "ffn_up.weight").T
            if self.arch == "gemma3":   # gelu_pytorch_tanh
                act = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)))
            else:                       # silu
                act = gate / (1 + np.exp(-gate))
            f = (act * up) @ self.w(p + "ffn_down.weight").T
            if self.arch == "gemma3":
                f = self.rms(f, self.w(p + "post_ffw_norm.weight"))
            x = x + f
        x = self.rms(x, self.w("output_norm.weight"))
        out = "output.weight" if "output.weight" in self.t else "token_embd.weight"
        vocab = int(self.t[out].shape[1])
        block = 16384
        return np.concatenate([x @ self.rows(out, np.arange(r0, min(r0 + block, vocab))).T
                               for r0 in range(0, vocab, block)], axis=-1)

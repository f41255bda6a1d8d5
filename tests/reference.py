"""A plain dense float64 forward pass, written from the published Llama architecture.

Independent of tensorsplit: weights come from gguf-py's GGUFReader and numpy dequantization,
the math is numpy float64, and rope is applied the Hugging Face way (rotate_half on the
original weight layout), after undoing llama.cpp's converter permutation of the q/k rows.
So a wrong rope layout, head split or norm in tensorsplit shows up as a mismatch here.
"""
from __future__ import annotations

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class DenseLlama:
    def __init__(self, path):
        self.r = GGUFReader(str(path))
        self.t = {t.name: t for t in self.r.tensors}
        f = self.r.fields
        arch = bytes(f["general.architecture"].parts[-1]).decode()
        kv = lambda k, d=None: (f[k].contents() if k in f else d)  # noqa: E731
        self.n_layers = kv(f"{arch}.block_count")
        self.n_embd = kv(f"{arch}.embedding_length")
        self.n_heads = kv(f"{arch}.attention.head_count")
        self.n_kv = kv(f"{arch}.attention.head_count_kv", self.n_heads)
        self.hd = kv(f"{arch}.attention.key_length", self.n_embd // self.n_heads)
        self.base = kv(f"{arch}.rope.freq_base", 10000.0)
        self.eps = kv(f"{arch}.attention.layer_norm_rms_epsilon")
        # llama3-style scaling: per-frequency divisors in rope_freqs.weight; linear: positions / factor
        self.freq_factors = self.w("rope_freqs.weight") if "rope_freqs.weight" in self.t else None
        scaling = kv(f"{arch}.rope.scaling.type", "none")
        self.pos_scale = 1.0 / kv(f"{arch}.rope.scaling.factor", 1.0) if scaling == "linear" else 1.0

    def w(self, name) -> np.ndarray:
        t = self.t[name]
        return dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64).reshape(
            [int(d) for d in reversed(t.shape)])   # torch order: (out, in)

    @staticmethod
    def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
        """Undo convert_hf_to_gguf's q/k row permutation, back to the original (HF) layout."""
        out = w.shape[0]
        return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        """x (n, heads, hd), HF rotate_half convention."""
        half = self.hd // 2
        inv = self.base ** (-np.arange(0, self.hd, 2, dtype=np.float64) / self.hd)
        if self.freq_factors is not None:
            inv = inv / self.freq_factors
        ang = (pos * self.pos_scale)[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        cos, sin = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def logits(self, ids) -> np.ndarray:
        """ids (n,) one sequence from position 0 -> (n, vocab) float64."""
        ids = np.asarray(ids)
        n, hd = len(ids), self.hd
        pos = np.arange(n, dtype=np.float64)
        emb = self.w("token_embd.weight")
        x = emb[ids]
        mask = np.tril(np.ones((n, n), dtype=bool))
        g = self.n_heads // self.n_kv
        for i in range(self.n_layers):
            p = f"blk.{i}."
            h = self.rms(x, self.w(p + "attn_norm.weight"))
            q = (h @ self.unpermute(self.w(p + "attn_q.weight"), self.n_heads).T).reshape(n, self.n_heads, hd)
            k = (h @ self.unpermute(self.w(p + "attn_k.weight"), self.n_kv).T).reshape(n, self.n_kv, hd)
            v = (h @ self.w(p + "attn_v.weight").T).reshape(n, self.n_kv, hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)          # (n, n_heads, hd)
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
            s = np.where(mask[None], s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = np.einsum("hqk,khd->qhd", s, v).reshape(n, -1)
            x = x + a @ self.w(p + "attn_output.weight").T
            h = self.rms(x, self.w(p + "ffn_norm.weight"))
            gate, up = h @ self.w(p + "ffn_gate.weight").T, h @ self.w(p + "ffn_up.weight").T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ self.w(p + "ffn_down.weight").T
        x = self.rms(x, self.w("output_norm.weight"))
        out = self.w("output.weight") if "output.weight" in self.t else emb
        return x @ out.T

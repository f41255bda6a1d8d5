"""One rank's share of a decoder-only transformer, and its forward pass.

Data path of `forward`, per step (n tokens from possibly several sequences):
  ids (n,) -> vocab-parallel embedding (all-reduce) -> x (n, n_embd), mirrored on every rank
  each layer:
    h = rms_norm(x);  q, k, v = column-parallel projections of the rank's heads
    rope(q, k);  attention over the rank's KV cache -> (n, n_local_heads * head_dim)
    x += row-parallel o-proj (all-reduce #1)
    h = rms_norm(x);  x += row-parallel down(act(gate(h)) * up(h)) (all-reduce #2)
  rms_norm(x[logit_rows]) -> vocab-parallel head -> (m, local_vocab): this rank's logit slice
The module knows nothing of processes: `reduce` is handed in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import Attention, KVCache
from .config import ModelConfig
from .layers import (ColumnParallelLinear, Reduce, RowParallelLinear, VocabParallelEmbedding,
                     VocabParallelHead, rms_norm)
from .loader import LoadProgress, load_vector, load_weight
from .rope import Rope
from .shard_plan import RankShard


@dataclass
class Block:
    attn_norm: torch.Tensor            # (n_embd,)
    wq: ColumnParallelLinear           # -> (n, n_local_heads * head_dim)
    wk: ColumnParallelLinear           # -> (n, n_local_kv_heads * head_dim)
    wv: ColumnParallelLinear
    wo: RowParallelLinear              # (n, n_local_heads * head_dim) -> (n, n_embd), all-reduced
    ffn_norm: torch.Tensor
    w_gate: ColumnParallelLinear       # -> (n, local_ff)
    w_up: ColumnParallelLinear
    w_down: RowParallelLinear          # (n, local_ff) -> (n, n_embd), all-reduced


class RankModel:
    def __init__(self, cfg: ModelConfig, shard: RankShard, world: int, reduce: Reduce, gf,
                 device="cpu", on_progress=None):
        self.cfg, self.shard, self.world, self.device = cfg, shard, world, torch.device(device)
        slices = {t.name: t for t in shard.tensors}
        progress = LoadProgress(shard.nbytes, on_progress)

        def weight(name):
            w = load_weight(gf, slices[name], self.device)
            progress.step(slices[name])
            return w

        def vector(name):
            if name not in slices:
                return None
            v = load_vector(gf, slices[name], self.device)
            progress.step(slices[name])
            return v

        self.embed = VocabParallelEmbedding(weight("token_embd.weight"), shard.vocab[0], reduce, world)
        self.head = VocabParallelHead(self.embed.weight if cfg.tied_output else weight("output.weight"))
        self.output_norm = vector("output_norm.weight")
        freq_factors = vector("rope_freqs.weight")
        freq_scale = 1.0 / cfg.rope_scaling.factor if cfg.rope_scaling.kind == "linear" else 1.0
        self.rope = Rope(cfg.head_dim, cfg.rope_dim, cfg.rope_base, cfg.spec.rope_neox, freq_scale, freq_factors)
        self.attention = Attention(shard.q_heads, shard.kv_heads, cfg.group_size, cfg.head_dim, device=self.device)
        self.blocks = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            self.blocks.append(Block(
                attn_norm=vector(p + "attn_norm.weight"),
                wq=ColumnParallelLinear(weight(p + "attn_q.weight"), vector(p + "attn_q.bias")),
                wk=ColumnParallelLinear(weight(p + "attn_k.weight"), vector(p + "attn_k.bias")),
                wv=ColumnParallelLinear(weight(p + "attn_v.weight"), vector(p + "attn_v.bias")),
                wo=RowParallelLinear(weight(p + "attn_output.weight"), vector(p + "attn_output.bias"), reduce),
                ffn_norm=vector(p + "ffn_norm.weight"),
                w_gate=ColumnParallelLinear(weight(p + "ffn_gate.weight")),
                w_up=ColumnParallelLinear(weight(p + "ffn_up.weight")),
                w_down=RowParallelLinear(weight(p + "ffn_down.weight"), vector(p + "ffn_down.bias"), reduce),
            ))
        assert progress.done == shard.nbytes, (progress.done, shard.nbytes)
        self.cache: KVCache | None = None

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights this rank holds (the tied head shares the embedding's bytes)."""
        return self.shard.nbytes

    def allocate_cache(self, n_slots: int, n_ctx: int, dtype=torch.float32) -> KVCache:
        self.cache = KVCache(self.cfg.n_layers, n_slots, n_ctx, self.shard.n_local_kv_heads,
                             self.cfg.head_dim, self.device, dtype)
        return self.cache

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions, slots: (n,) int64. logit_rows: indices into the n tokens whose logits are
        wanted (default: all). Returns (m, local_vocab) float32: this rank's vocabulary slice."""
        cfg, sh = self.cfg, self.shard
        assert self.cache is not None, "allocate_cache() before forward()"
        self.cache.check(positions, slots)
        ids, positions, slots = (t.to(self.device) for t in (ids, positions, slots))
        n = ids.shape[0]
        cos, sin = self.rope.cos_sin(positions, self.device)
        x = self.embed(ids)                                                   # (n, n_embd)
        for i, b in enumerate(self.blocks):
            h = rms_norm(x, b.attn_norm, cfg.rms_eps)
            q = b.wq(h).view(n, sh.n_local_heads, cfg.head_dim)
            k = b.wk(h).view(n, sh.n_local_kv_heads, cfg.head_dim)
            v = b.wv(h).view(n, sh.n_local_kv_heads, cfg.head_dim)
            q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
            attn = self.attention(q, k, v, self.cache, i, positions, slots)   # (n, n_local_heads * head_dim)
            x = x + b.wo(attn)
            h = rms_norm(x, b.ffn_norm, cfg.rms_eps)
            x = x + b.w_down(F.silu(b.w_gate(h)) * b.w_up(h))
        if logit_rows is not None:
            x = x[logit_rows.to(self.device)]
        return self.head(rms_norm(x, self.output_norm, cfg.rms_eps))          # (m, local_vocab)

"""One rank's share of a decoder-only transformer, and its forward pass.

Data path of `forward`, per step (n tokens from possibly several sequences):
  ids (n,) -> vocab-parallel embedding (all-reduce) [* sqrt(n_embd): gemma] -> x (n, n_embd), mirrored
  each layer:
    h = rms_norm(x);  q, k, v = column-parallel projections of the rank's heads (or one fused qkv)
    [per-head rms_norm(q), rms_norm(k): qwen3, gemma]
    rope(q, k) (local layers: their own base);  attention over the rank's KV cache (local layers:
      only the last `swa_window` positions, kept in a ring) -> (n, n_local_heads * head_dim)
    a = row-parallel o-proj (all-reduce #1) [rms_norm(a): gemma];  x += a
    h = rms_norm(x);  f = row-parallel down(act(gate(h)) * up(h)) (all-reduce #2) [rms_norm(f): gemma]
    x += f
  rms_norm(x)[logit_rows] -> vocab-parallel head -> (m, local_vocab): this rank's logit slice
The bracketed steps are switched by the architecture's flags in arch.py.
The module knows nothing of processes or of which kernels run: `reduce` is handed in, and so are the
rank's kernels (kernels/base.py), which load the weights into their layout and do the arithmetic.
Calls are fused where a decode step would otherwise pay an operator dispatch each (step_program.py):
q | k | v and gate | up are one weight each where the kernels can stack them (fuse_rows); each residual
add is one call with the norm after it (add_rms_norm); per-head norm and rope are one (qkv_heads), and
so are the activation and its gate (glu).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .attention import Attention, KVCache
from .config import ModelConfig
from .decode_graphs import DecodeGraphs
from ..kernels.base import Kernels, MatmulInput
from ..kernels.quants import QWeight
from .layers import ColumnParallelLinear, Reduce, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead
from .loader import (LoadProgress, load_expert_biases, load_experts, load_gate_up_experts, load_router, load_vector,
                     load_weight)
from .moe import ExpertBiases, MoE, SharedExpert
from .rope import Rope
from .shard_plan import RankShard
from .step_program import MAX_TOKENS, record, replay_enabled
from ..messages import say


@dataclass
class Block:
    attn_norm: torch.Tensor                  # (n_embd,)
    wq: ColumnParallelLinear | None          # -> (n, n_local_heads * head_dim); None when fused
    wk: ColumnParallelLinear | None          # -> (n, n_local_kv_heads * head_dim)
    wv: ColumnParallelLinear | None
    wqkv: ColumnParallelLinear | None        # fused: -> (n, local q | local k | local v)
    q_norm: torch.Tensor | None              # (head_dim,), qk_norm archs
    k_norm: torch.Tensor | None
    wo: RowParallelLinear                    # (n, n_local_heads * head_dim) -> (n, n_embd), all-reduced
    post_attn_norm: torch.Tensor | None      # (n_embd,), post_norms archs
    ffn_norm: torch.Tensor
    w_gate: ColumnParallelLinear | None      # -> (n, local_ff); None when fused into w_up
    w_up: ColumnParallelLinear | None        # -> (n, local_ff), or (n, 2 * local_ff) = gate | up when fused
    w_down: RowParallelLinear | None         # (n, local_ff) -> (n, n_embd), all-reduced
    post_ffn_norm: torch.Tensor | None
    local: bool                              # sliding-window layer
    moe: MoE | None = None                   # a mixture-of-experts FFN instead of gate/up/down
    sinks: torch.Tensor | None = None        # (n_local_heads,) attention sinks (gpt-oss)


def _return_freed_memory() -> None:
    """glibc keeps freed heap memory for reuse; give it back to the OS (Linux), so that a rank's resident
    memory after loading is its weights, not also the transient copies repacking freed."""
    import ctypes
    import sys
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


class RankModel:
    def __init__(self, cfg: ModelConfig, shard: RankShard, world: int, reduce: Reduce, gf, kernels: Kernels,
                 on_progress=None):
        """kernels: the rank's (kernels/choice.py), on its device."""
        self.cfg, self.shard, self.world, self.kernels = cfg, shard, world, kernels
        self.device = kernels.device
        self.norm = kernels.rms_norm
        spec = cfg.spec
        slices = {t.name: t for t in shard.tensors}
        progress = LoadProgress(shard.nbytes, on_progress)
        self.resident_bytes = 0    # weight bytes held, after any repacking

        def weight(name):
            w = load_weight(gf, slices[name], kernels)
            progress.step(slices[name])
            self.resident_bytes += w.nbytes
            return w

        def vector(name):
            if name not in slices:
                return None
            v = load_vector(gf, slices[name], self.device)
            progress.step(slices[name])
            self.resident_bytes += v.numel() * v.element_size()
            return v

        def experts(name):
            ws = load_experts(gf, slices[name], kernels)
            progress.step(slices[name])
            self.resident_bytes += sum(w.nbytes for w in ws if w is not None)
            return ws

        def router(name):
            r = load_router(gf, slices[name], kernels)
            progress.step(slices[name])
            self.resident_bytes += r.nbytes if isinstance(r, QWeight) else r.numel() * r.element_size()
            return r

        def gate_up_experts(p):
            """(gate, up) per expert: from a fused ffn_gate_up_exps, or the two tensors."""
            name = p + "ffn_gate_up_exps.weight"
            if name not in slices:
                return experts(p + "ffn_gate_exps.weight"), experts(p + "ffn_up_exps.weight")
            gate, up = load_gate_up_experts(gf, slices[name], kernels)
            progress.step(slices[name])
            self.resident_bytes += sum(w.nbytes for w in gate + up if w is not None)
            return gate, up

        def expert_biases(name):
            bs = load_expert_biases(gf, slices[name], self.device)
            progress.step(slices[name])
            self.resident_bytes += sum(4 * b.numel() for b in bs if b is not None)
            return bs

        def moe(p):
            if spec.moe is None:
                return None
            biases = None
            if p + "ffn_gate_exps.bias" in slices:      # gpt-oss
                down_bias = weight(p + "ffn_down_exps.bias").data.to(self.device)      # (n_expert, n_embd) float32
                biases = ExpertBiases(expert_biases(p + "ffn_gate_exps.bias"), expert_biases(p + "ffn_up_exps.bias"),
                                      down_bias)
            shared = None
            if spec.moe.shared_expert:
                shared = SharedExpert(vector(p + "ffn_gate_inp_shexp.weight"), weight(p + "ffn_gate_shexp.weight"),
                                      weight(p + "ffn_up_shexp.weight"), weight(p + "ffn_down_shexp.weight"))
            return MoE(router(p + "ffn_gate_inp.weight"), *gate_up_experts(p), experts(p + "ffn_down_exps.weight"),
                       cfg.n_expert_used, spec.moe, spec.activation, reduce, kernels, shared, vector(p + "ffn_gate_inp.bias"),
                       biases)

        def column(name, bias=None):
            return ColumnParallelLinear(weight(name), vector(bias), kernels) if name in slices else None

        self.embed = VocabParallelEmbedding(weight("token_embd.weight"), shard.vocab[0], reduce, world, kernels)
        self.embed_scale = math.sqrt(cfg.n_embd) if spec.embed_scale else None
        self.head = VocabParallelHead(self.embed.weight if cfg.tied_output else weight("output.weight"), kernels)
        self.output_norm = vector("output_norm.weight")
        # rope frequency factors: llama3's rope_freqs, or Phi-3 LongRoPE's pair (chosen by context size)
        self.rope_factors = {k: vector(k + ".weight")
                             for k in ("rope_freqs", "rope_factors_long", "rope_factors_short")}
        self.act = kernels.activation(spec.activation)
        self.attention = Attention(shard.q_heads, shard.kv_heads, cfg.group_size, cfg.head_dim, kernels,
                                   scale=cfg.attn_scale, q_prescaled=spec.q_prescaled)
        self.blocks = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            self.blocks.append(Block(
                attn_norm=vector(p + "attn_norm.weight"),
                wq=column(p + "attn_q.weight", p + "attn_q.bias"),
                wk=column(p + "attn_k.weight", p + "attn_k.bias"),
                wv=column(p + "attn_v.weight", p + "attn_v.bias"),
                wqkv=column(p + "attn_qkv.weight", p + "attn_qkv.bias"),
                q_norm=vector(p + "attn_q_norm.weight"),
                k_norm=vector(p + "attn_k_norm.weight"),
                wo=RowParallelLinear(weight(p + "attn_output.weight"), vector(p + "attn_output.bias"), reduce,
                                     kernels),
                post_attn_norm=vector(p + "post_attention_norm.weight") if spec.post_norms else None,
                ffn_norm=vector(p + spec.ffn_norm),
                sinks=vector(p + "attn_sinks.weight"),
                moe=moe(p),
                w_gate=column(p + "ffn_gate.weight"),
                w_up=column(p + "ffn_up.weight"),
                w_down=(RowParallelLinear(weight(p + "ffn_down.weight"), vector(p + "ffn_down.bias"), reduce,
                                          kernels) if p + "ffn_down.weight" in slices else None),
                post_ffn_norm=vector(p + "post_ffw_norm.weight"),
                local=cfg.is_swa(i),
            ))
            self._fuse_projections(self.blocks[-1])
        assert progress.done == shard.nbytes, (progress.done, shard.nbytes)
        gf.release_data()        # the shard is copied out: the mapped file pages need not stay resident
        _return_freed_memory()   # nor the GGUF-layout copies that the repacking freed
        self.cache: KVCache | None = None
        self.graphs: DecodeGraphs | None = None
        self.programs: dict | None = None     # recorded decode steps by (tokens, logit rows) (step_program.py)
        self.time_replays = False             # a profiled rank times each replayed call
        self.ropes = self._ropes(n_ctx=0)

    def _fuse_projections(self, b: Block) -> None:
        """q, k and v into one weight, and gate and up into one, where the kernels can stack their rows
        (fuse_rows): one matmul call each, the layout a fused file (attn_qkv, Phi-3's ffn_up) has."""
        def fused(parts):
            biases = [p.bias for p in parts]
            if any(bi is None for bi in biases) and any(bi is not None for bi in biases):
                return None
            w = self.kernels.fuse_rows([p.weight for p in parts])
            return None if w is None else ColumnParallelLinear(
                w, None if biases[0] is None else torch.cat(biases), self.kernels)
        if b.wq is not None:
            qkv = fused([b.wq, b.wk, b.wv])
            if qkv is not None:
                b.wqkv, b.wq, b.wk, b.wv = qkv, None, None, None
        if b.w_gate is not None:
            gate_up = fused([b.w_gate, b.w_up])
            if gate_up is not None:
                b.w_up, b.w_gate = gate_up, None

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights this rank holds, as loaded (the tied head shares the embedding's bytes; 1-D
        tensors as float32); the tiled layout pads rows to whole tiles and widens some K-quant scales
        (<= 4%). Equal to loader.resident_bytes of the shard, which `info` shows before loading."""
        return self.resident_bytes

    def _ropes(self, n_ctx: int) -> dict[bool, Rope]:
        """Rope of global layers (key False) and, with sliding-window layers, of local ones (key True).

        LongRoPE (llama.cpp's rule): the long factors when a sequence's context exceeds the original
        training context, else the short ones. (llama.cpp first rounds its context up to a multiple
        of 256, so with an original context that is not one, the two can choose differently just
        below it.) Local layers use their own base and no scaling (rope_freq_scale_train_swa = 1)."""
        cfg = self.cfg
        factors = self.rope_factors["rope_freqs"]
        if cfg.rope_long_short:
            original = cfg.rope_scaling.original_context or cfg.n_ctx_train
            factors = self.rope_factors["rope_factors_long" if n_ctx > original else "rope_factors_short"]
        sc = cfg.rope_scaling
        yarn = (sc.original_context, sc.beta_fast, sc.beta_slow, sc.ext) if sc.ext else None
        ropes = {False: Rope(cfg.head_dim, cfg.rope_dim, cfg.rope_base, cfg.spec.rope_neox, sc.freq_scale, factors,
                             sc.mscale, yarn)}
        if cfg.swa_layers and cfg.spec.swa_rope_scaled:    # gpt-oss: local layers scaled as the global ones
            ropes[True] = Rope(cfg.head_dim, cfg.rope_dim, cfg.rope_base_swa, cfg.spec.rope_neox, sc.freq_scale,
                               None, sc.mscale, yarn)
        elif cfg.swa_layers:
            ropes[True] = Rope(cfg.head_dim, cfg.rope_dim, cfg.rope_base_swa, cfg.spec.rope_neox)
        return {local: rope.build(max(n_ctx, 1), self.kernels) for local, rope in ropes.items()}

    def allocate_cache(self, n_slots: int, n_ctx: int, dtype: torch.dtype | None = None,
                       decode_graphs: str | None = None, kv_types: tuple[str, str] | None = None) -> KVCache:
        """kv_types: what the cache stores keys and values as (kernels/kv_types.py; the world plan's),
        else dtype for both, else the kernels' numerics' default. decode_graphs: "cuda" to replay decode
        steps as CUDA graphs, "eager" for the same fixed-shape steps without capture (tests), None for
        none (decode_graphs.py)."""
        if kv_types is None:
            kv_types = (dtype or self.kernels.kv_dtype,) * 2
        self.cache = KVCache(self.cfg.n_layers, n_slots, n_ctx, self.shard.n_local_kv_heads,
                             self.cfg.head_dim, self.device, kv_types[0], self.cfg.layer_windows,
                             static=decode_graphs is not None, v_type=kv_types[1])
        self.ropes = self._ropes(n_ctx)
        # recorded steps hold the old cache and rope tables: none survives a new cache
        self.programs = {} if self._replayable() else None
        self.graphs = None if decode_graphs is None else DecodeGraphs(
            self._static_step, self.device, n_ctx, self.cache.scratch_slot, decode_graphs)
        return self.cache

    def _qkv(self, b: Block, h: torch.Tensor, positions: torch.Tensor):
        """h (n, n_embd) -> q (n, n_local_heads, hd), k and v (n, n_local_kv_heads, hd): q and k normed per
        head (qk-norm archs) and rotated."""
        sh = self.shard
        h = MatmulInput(h)                            # quantized once for q, k and v
        if b.wqkv is not None:   # fused rows: this rank's q heads, then its k heads, then its v heads
            q, k, v = b.wqkv(h), None, None
        else:
            q, k, v = b.wq(h), b.wk(h), b.wv(h)
        return self.kernels.qkv_heads(q, k, v, (sh.n_local_heads, sh.n_local_kv_heads), positions,
                                      self.ropes[b.local], b.q_norm, b.k_norm, self.cfg.rms_eps)

    def _ffn(self, b: Block, h: torch.Tensor) -> torch.Tensor:
        """Gated FFN: down(act(gate(h)) * up(h)), summed over ranks (or the experts' weighted sum), as
        the sum arrives (layers.py RowParallelLinear.summed)."""
        if b.moe is not None:
            return b.moe(h)
        h = MatmulInput(h)                            # quantized once for gate and up
        if b.w_gate is None:     # fused rows: this rank's gate range, then its up range
            a = self.kernels.glu(b.w_up(h), None, self.cfg.spec.activation)
        else:
            a = self.kernels.glu(b.w_gate(h), b.w_up(h), self.cfg.spec.activation)
        return b.w_down.summed(a)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions, slots: (n,) int64. logit_rows: indices into the n tokens whose logits are
        wanted (default: all). Returns (m, local_vocab) float32: this rank's vocabulary slice."""
        assert self.cache is not None, "allocate_cache() before forward()"
        self.cache.check(positions, slots)
        if self.graphs is not None and self.graphs.fits(slots):       # a decode step: one token per slot
            logits = self.graphs.run(ids, positions, slots)
            return logits if logit_rows is None else logits[logit_rows.to(self.device)]
        if self.programs is not None and logit_rows is not None and ids.numel() <= MAX_TOKENS:
            return self._replayed(ids, positions, slots, logit_rows)
        return self._step(ids, positions, slots, logit_rows)

    def _replayable(self) -> bool:
        """Decode steps recorded and replayed from C++: on a CPU rank with the native kernels. A mixture of
        experts' step replays where its experts run as one op (kernels/native_kernels.py); where they do
        not (the per-expert path reads its routing back into Python) the recording refuses the step."""
        return (self.device.type == "cpu" and getattr(self.kernels, "name", "") == "native" and
                replay_enabled())

    def _replayed(self, ids, positions, slots, logit_rows) -> torch.Tensor:
        """_step, recorded once per (tokens, logit rows) and replayed from C++ after (step_program.py)."""
        key = (ids.numel(), logit_rows.numel())
        inputs = [t.to(self.device, torch.int64) for t in (ids, positions, slots, logit_rows)]
        if key in self.programs:
            program = self.programs[key]
            if program is not None:
                return program.run(inputs, self.time_replays)
            return self._step(*inputs)
        out, self.programs[key], why = record(self._step, inputs, self)
        if why is not None and os.environ.get("TENSORSPLIT_DEBUG"):
            say(f"decode steps of {key[0]} token(s) stay eager: {why}")
        return out

    def replayed_ns(self) -> dict[str, float]:
        """ns per operator in the timed replays since the last call (profiles: time_replays)."""
        out: dict[str, float] = {}
        for program in (self.programs or {}).values():
            if program is not None:
                for name, ns in program.times().items():
                    out[name] = out.get(name, 0.0) + ns
        return out

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
              logit_rows: torch.Tensor | None) -> torch.Tensor:
        """The step after the bounds checks: everything here may be recorded (step_program.py)."""
        ids, positions, slots = (t.to(self.device) for t in (ids, positions, slots))

        def attend(q, k, v, layer):
            return self.attention(q, k, v, self.cache, layer, positions, slots, self.blocks[layer].sinks)
        h = self._layers(self._embed(ids), positions, attend)                # output-normed, (n, n_embd)
        if logit_rows is not None:
            h = h.index_select(0, logit_rows.to(self.device))
        return self.head(h)                                                  # (m, local_vocab)

    def _static_step(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                     kv_len: int) -> torch.Tensor:
        """The forward of a decode step with fixed shapes and no host synchronisation (device tensors
        in, every row's logits out): what decode_graphs.py captures."""
        with torch.inference_mode():
            def attend(q, k, v, layer):
                return self.attention.decode_static(q, k, v, self.cache, layer, positions, slots, kv_len,
                                                    self.blocks[layer].sinks)
            return self.head(self._layers(self._embed(ids), positions, attend))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)                                                   # (n, n_embd)
        return x * self.embed_scale if self.embed_scale is not None else x

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """Every layer over x (n, n_embd), and the output norm: -> rms_norm(x_out) (n, n_embd).
        attend(q, k, v, layer) -> (n, n_local_heads * head_dim). Each residual add is fused with the
        norm after it (kernels.add_rms_norm): h is always the next norm's output."""
        cfg, norm, eps = self.cfg, self.kernels.add_rms_norm, self.cfg.rms_eps
        h = self.norm(x, self.blocks[0].attn_norm, eps)
        for i, b in enumerate(self.blocks):
            q, k, v = self._qkv(b, h, positions)
            x, h = norm(x, b.wo.summed(attend(q, k, v, i)), b.ffn_norm, eps, b.post_attn_norm)
            next_norm = self.blocks[i + 1].attn_norm if i + 1 < len(self.blocks) else self.output_norm
            x, h = norm(x, self._ffn(b, h), next_norm, eps, b.post_ffn_norm)
        return h

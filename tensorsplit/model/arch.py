"""Per-architecture conventions: which tensors a layer has, their shapes, how each is split, and
the few flags that make one decoder differ from another.

This table is the one source of truth for tensor names and per-family behaviour. The config
checks the file against it, the shard plan reads each tensor's `split` role from it, and the
loader and the forward pass follow the plan and the flags. An architecture not listed here is
refused with the list of those that are (never guessed). The facts come from llama.cpp
(src/llama-model.cpp, src/models/*.cpp, convert_hf_to_gguf.py); each flag says where.

Split roles (ggml shapes: ne0 is the input dim, ne1 the output dim of a weight):
  q_rows       output rows of the query projection, cut at whole query heads
  kv_rows      output rows of the key/value projections, cut at whole KV heads (replicated when
               ranks outnumber KV heads)
  qkv_rows     a fused [q; k; v] projection: three row ranges per rank, its q heads then its KV heads
  ffn_rows     output rows of gate/up, cut on the FFN plan
  gate_up_rows a fused [gate; up] projection: two row ranges per rank, its FFN range in each half
  o_cols       input columns of the attention output projection, cut at the rank's query heads
  ffn_cols     input columns of ffn_down, cut on the FFN plan
  exp_rows     output rows of every expert's gate/up (3-D [n_embd, n_ff_exp, n_expert]), cut on the
               expert FFN plan: each rank holds the same rows of every expert
  exp_cols     input columns of every expert's down (3-D [n_ff_exp, n_embd, n_expert]), likewise
  shexp_rows   output rows of the shared expert's gate/up, cut on the shared-expert FFN plan
  shexp_cols   input columns of the shared expert's down
  vocab_rows   rows of token_embd / output, cut by vocabulary
  q_heads      one value per query head (gpt-oss's attention sinks), cut at the rank's query heads
  exp_bias     per expert a bias of its gate/up rows (2-D [n_ff_exp, n_expert]), cut as exp_rows
  exp_gate_up_rows  a fused ffn_gate_up_exps [n_embd, 2 n_ff_exp, n_expert]: per expert its gate rows,
               then its up rows (llama.cpp's create_tensor_gate_up_exps), each cut as exp_rows
  mirror       every rank holds all of it (norms, rope factors, biases of input-split weights)
  router       a mixture of experts' router, mirrored: every rank routes alike, with no broadcast;
               an F32 router is held in float64 (loader.py), so that every rank's logits round alike
For a 1-D bias the role's axis is its only axis.
"""
from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass
from typing import Callable

from ..errors import UnsupportedError

SPLIT_ROLES = ("q_rows", "kv_rows", "qkv_rows", "ffn_rows", "gate_up_rows", "o_cols", "ffn_cols",
               "exp_rows", "exp_cols", "shexp_rows", "shexp_cols", "vocab_rows", "mirror", "router",
               "q_heads", "exp_bias", "exp_gate_up_rows")
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class TensorRole:
    suffix: str                              # name after "blk.{i}." (or the whole name for a global tensor)
    shape: Callable[[object], tuple]         # cfg -> ggml shape
    split: str                               # one of SPLIT_ROLES
    optional: bool = False                   # may be absent from the file (biases, rope factors)


def _head_dim_scale(cfg) -> float:
    return 1.0 / math.sqrt(cfg.head_dim)


@dataclass(frozen=True)
class MoeSpec:
    """How a mixture-of-experts layer routes, as llama.cpp's graph for the arch calls build_moe_ffn
    (src/models/*.cpp). gating "softmax": softmax over the router's logits, the top expert_used_count
    experts by probability, their probabilities as weights, divided by their sum where `norm_weights`.
    gating "softmax_weight" (gpt-oss): the top experts by logit, a softmax over their logits as weights."""
    norm_weights: bool
    shared_expert: bool = False   # qwen2moe: a shared expert, scaled by sigmoid(ffn_gate_inp_shexp . x)
    gating: str = "softmax"       # "softmax" | "softmax_weight"
    activation: str | None = None  # the experts' own activation where it is not the arch's: "swiglu_oai"


@dataclass(frozen=True)
class ArchSpec:
    name: str
    rope_neox: bool          # NeoX layout rotates (x[i], x[i + d/2]); the normal layout rotates (x[2i], x[2i+1])
    layer_tensors: tuple[TensorRole, ...]
    global_tensors: tuple[TensorRole, ...] = ()   # beyond token_embd / output_norm / output (all mirrored)
    embed_scale: bool = False     # embeddings times sqrt(n_embd) after the lookup
    qk_norm: bool = False         # per-head RMSNorm of q and k (attn_q_norm, attn_k_norm), before rope
    post_norms: bool = False      # RMSNorm of the attention and FFN outputs before each residual add
    activation: str = "silu"      # gated FFN: act(gate) * up; "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    swa_pattern: int = 0          # sliding-window layers: every n-th layer global, the rest local; 0 = none
    rope_base_swa: float = 0.0    # rope base of the local layers unless {arch}.rope.freq_base_swa says otherwise
    attn_scale: Callable[[object], float] = _head_dim_scale   # cfg -> softmax scale of q.k
    q_prescaled: bool = False     # llama.cpp scales q itself before attention (kq_scale 1), not q.k in its
                                  # softmax: it matters only where --numerics llamacpp rounds q to f16
    moe: MoeSpec | None = None    # every layer's FFN is a mixture of experts
    ffn_norm: str = "ffn_norm.weight"   # the norm before the FFN (gpt-oss: post_attention_norm.weight)
    swa_rope_scaled: bool = False       # local layers take the global rope scaling too (gpt-oss), else none

    def __post_init__(self):
        assert self.activation in ACTIVATIONS, self.activation
        assert all(r.split in SPLIT_ROLES for r in self.layer_tensors + self.global_tensors)

    @property
    def fused_qkv(self) -> bool:
        """One attn_qkv weight whose rows are q, then k, then v."""
        return any(r.split == "qkv_rows" for r in self.layer_tensors)

    @property
    def fused_gate_up(self) -> bool:
        """ffn_up holds the gate rows, then the up rows; there is no ffn_gate."""
        return any(r.split == "gate_up_rows" for r in self.layer_tensors)

    def layer_shapes(self, cfg, i: int) -> dict[str, tuple[int, ...]]:
        return {f"blk.{i}.{r.suffix}": r.shape(cfg) for r in self.layer_tensors}

    def optional_tensors(self, cfg) -> set[str]:
        out = {f"blk.{i}.{r.suffix}" for i in range(cfg.n_layers) for r in self.layer_tensors if r.optional}
        return out | {r.suffix for r in self.global_tensors if r.optional}

    def role(self, suffix: str) -> TensorRole:
        return next(r for r in self.layer_tensors if r.suffix == suffix)


def _t(suffix, shape, split, optional=False) -> TensorRole:
    return TensorRole(suffix, shape, split, optional)


def _layer(*, qkv_bias: str = "optional", fused_qkv: bool = False, qk_norm: bool = False,
           post_norms: bool = False, fused_gate_up: bool = False, moe: MoeSpec | None = None) -> tuple[TensorRole, ...]:
    """The tensors of one decoder layer. qkv_bias: "optional" (llama: some files have them),
    "required" (qwen2) or "none". moe: experts (llama.cpp's 3-D ffn_*_exps) instead of a dense FFN."""
    roles = [_t("attn_norm.weight", lambda c: (c.n_embd,), "mirror")]
    if fused_qkv:
        roles.append(_t("attn_qkv.weight", lambda c: (c.n_embd, c.q_dim + 2 * c.kv_dim), "qkv_rows"))
    else:
        roles += [_t("attn_q.weight", lambda c: (c.n_embd, c.q_dim), "q_rows"),
                  _t("attn_k.weight", lambda c: (c.n_embd, c.kv_dim), "kv_rows"),
                  _t("attn_v.weight", lambda c: (c.n_embd, c.kv_dim), "kv_rows")]
        if qkv_bias != "none":
            opt = qkv_bias == "optional"
            roles += [_t("attn_q.bias", lambda c: (c.q_dim,), "q_rows", opt),
                      _t("attn_k.bias", lambda c: (c.kv_dim,), "kv_rows", opt),
                      _t("attn_v.bias", lambda c: (c.kv_dim,), "kv_rows", opt)]
    if qk_norm:
        roles += [_t("attn_q_norm.weight", lambda c: (c.head_dim,), "mirror"),
                  _t("attn_k_norm.weight", lambda c: (c.head_dim,), "mirror")]
    roles.append(_t("attn_output.weight", lambda c: (c.q_dim, c.n_embd), "o_cols"))
    if qkv_bias == "optional":
        roles.append(_t("attn_output.bias", lambda c: (c.n_embd,), "mirror", optional=True))
    if post_norms:
        roles.append(_t("post_attention_norm.weight", lambda c: (c.n_embd,), "mirror"))
    roles.append(_t("ffn_norm.weight", lambda c: (c.n_embd,), "mirror"))
    if moe:
        roles += [_t("ffn_gate_inp.weight", lambda c: (c.n_embd, c.n_expert), "router"),
                  _t("ffn_gate_exps.weight", lambda c: (c.n_embd, c.n_ff_exp, c.n_expert), "exp_rows"),
                  _t("ffn_up_exps.weight", lambda c: (c.n_embd, c.n_ff_exp, c.n_expert), "exp_rows"),
                  _t("ffn_down_exps.weight", lambda c: (c.n_ff_exp, c.n_embd, c.n_expert), "exp_cols")]
        if moe.shared_expert:
            roles += [_t("ffn_gate_inp_shexp.weight", lambda c: (c.n_embd,), "mirror"),
                      _t("ffn_gate_shexp.weight", lambda c: (c.n_embd, c.n_ff_shexp), "shexp_rows"),
                      _t("ffn_up_shexp.weight", lambda c: (c.n_embd, c.n_ff_shexp), "shexp_rows"),
                      _t("ffn_down_shexp.weight", lambda c: (c.n_ff_shexp, c.n_embd), "shexp_cols")]
    elif fused_gate_up:
        roles.append(_t("ffn_up.weight", lambda c: (c.n_embd, 2 * c.n_ff), "gate_up_rows"))
    else:
        roles += [_t("ffn_gate.weight", lambda c: (c.n_embd, c.n_ff), "ffn_rows"),
                  _t("ffn_up.weight", lambda c: (c.n_embd, c.n_ff), "ffn_rows")]
    if not moe:
        roles.append(_t("ffn_down.weight", lambda c: (c.n_ff, c.n_embd), "ffn_cols"))
    if post_norms:
        roles.append(_t("post_ffw_norm.weight", lambda c: (c.n_embd,), "mirror"))
    return tuple(roles)


def _gemma3_attn_scale(cfg) -> float:
    # llama.cpp (LLM_ARCH_GEMMA3 hparams) follows gemma_pytorch's query_pre_attn_scalar: head_dim for
    # every size but the 27B, which it recognises by its 62 layers and scales by n_embd / n_heads.
    return 1.0 / math.sqrt(cfg.n_embd // cfg.n_heads if cfg.n_layers == 62 else cfg.head_dim)


def _gpt_oss_layer() -> tuple[TensorRole, ...]:
    """gpt-oss (llama.cpp's openai-moe.cpp): biased q/k/v/o, a sink per query head, post_attention_norm
    as the FFN's norm, a biased router and biased experts (3-D weights, 2-D biases)."""
    return (
        _t("attn_norm.weight", lambda c: (c.n_embd,), "mirror"),
        _t("attn_q.weight", lambda c: (c.n_embd, c.q_dim), "q_rows"),
        _t("attn_k.weight", lambda c: (c.n_embd, c.kv_dim), "kv_rows"),
        _t("attn_v.weight", lambda c: (c.n_embd, c.kv_dim), "kv_rows"),
        _t("attn_q.bias", lambda c: (c.q_dim,), "q_rows", optional=True),
        _t("attn_k.bias", lambda c: (c.kv_dim,), "kv_rows", optional=True),
        _t("attn_v.bias", lambda c: (c.kv_dim,), "kv_rows", optional=True),
        _t("attn_output.weight", lambda c: (c.q_dim, c.n_embd), "o_cols"),
        _t("attn_output.bias", lambda c: (c.n_embd,), "mirror"),
        _t("attn_sinks.weight", lambda c: (c.n_heads,), "q_heads"),
        _t("post_attention_norm.weight", lambda c: (c.n_embd,), "mirror"),
        _t("ffn_gate_inp.weight", lambda c: (c.n_embd, c.n_expert), "router"),
        _t("ffn_gate_inp.bias", lambda c: (c.n_expert,), "mirror"),
        _t("ffn_gate_exps.weight", lambda c: (c.n_embd, c.n_ff_exp, c.n_expert), "exp_rows"),
        _t("ffn_up_exps.weight", lambda c: (c.n_embd, c.n_ff_exp, c.n_expert), "exp_rows"),
        _t("ffn_down_exps.weight", lambda c: (c.n_ff_exp, c.n_embd, c.n_expert), "exp_cols"),
        _t("ffn_gate_exps.bias", lambda c: (c.n_ff_exp, c.n_expert), "exp_bias"),
        _t("ffn_up_exps.bias", lambda c: (c.n_ff_exp, c.n_expert), "exp_bias"),
        _t("ffn_down_exps.bias", lambda c: (c.n_embd, c.n_expert), "mirror"),
    )


_QWEN3_MOE = MoeSpec(norm_weights=True)
_QWEN2_MOE = MoeSpec(norm_weights=False, shared_expert=True)
_MIXTRAL_MOE = MoeSpec(norm_weights=True)
_GPT_OSS_MOE = MoeSpec(norm_weights=False, gating="softmax_weight", activation="swiglu_oai")

_ROPE_FACTORS = tuple(_t(f"rope_factors_{kind}.weight", lambda c: (c.rope_dim // 2,), "mirror", optional=True)
                      for kind in ("long", "short"))

ARCHS: dict[str, ArchSpec] = {
    # LLM_ARCH_LLAMA uses the normal rope layout: the converter permutes q/k rows for it. Llama 3.1+
    # files carry llama3-style rope scaling as per-frequency factors, rope_freqs.
    "llama": ArchSpec("llama", rope_neox=False, layer_tensors=_layer(), global_tensors=(
        _t("rope_freqs.weight", lambda c: (c.rope_dim // 2,), "mirror", optional=True),)),
    # Qwen2: q/k/v biases (required), NeoX rope.
    "qwen2": ArchSpec("qwen2", rope_neox=True, layer_tensors=_layer(qkv_bias="required")),
    # Qwen3: per-head q/k RMSNorm before rope, no biases, NeoX rope.
    "qwen3": ArchSpec("qwen3", rope_neox=True, layer_tensors=_layer(qkv_bias="none", qk_norm=True), qk_norm=True),
    # Phi-3: fused attn_qkv and fused ffn_up = [gate; up] (ggml_swiglu: silu of the first half times the
    # second), NeoX rope; LongRoPE variants carry rope_factors_long/short (see config.py). llama.cpp
    # ignores phi3's sliding_window (disabled there), and so do we.
    "phi3": ArchSpec("phi3", rope_neox=True, global_tensors=_ROPE_FACTORS, q_prescaled=True,
                     layer_tensors=_layer(qkv_bias="none", fused_qkv=True, fused_gate_up=True)),
    # Gemma 3: embeddings * sqrt(n_embd); q/k norms; post-attention and post-FFN norms; GeGLU (tanh);
    # every 6th layer global, the others sliding-window with rope base 10000 (set_swa_pattern(6),
    # rope_freq_base_train_swa). The converter adds Gemma's "+1" into every stored norm weight, so all
    # norms are the plain x * w here.
    "gemma3": ArchSpec("gemma3", rope_neox=True, layer_tensors=_layer(qkv_bias="none", qk_norm=True, post_norms=True),
                       embed_scale=True, qk_norm=True, post_norms=True, activation="gelu_tanh",
                       swa_pattern=6, rope_base_swa=10000.0, attn_scale=_gemma3_attn_scale, q_prescaled=True),
    # Qwen3-MoE (qwen3moe.cpp): qwen3's attention; every FFN 128 experts (Qwen3-30B-A3B), top 8, the
    # selected probabilities renormalised (norm_w true), no shared expert.
    "qwen3moe": ArchSpec("qwen3moe", rope_neox=True, qk_norm=True, moe=_QWEN3_MOE,
                         layer_tensors=_layer(qkv_bias="none", qk_norm=True, moe=_QWEN3_MOE)),
    # Qwen1.5/2-MoE (qwen2moe.cpp): qwen2's attention with q/k/v biases; top-k weights not renormalised
    # (norm_w false); a shared expert added, scaled by sigmoid of its own gate.
    "qwen2moe": ArchSpec("qwen2moe", rope_neox=True, moe=_QWEN2_MOE,
                         layer_tensors=_layer(qkv_bias="required", moe=_QWEN2_MOE)),
    # gpt-oss (openai-moe.cpp): NeoX rope with YaRN on every layer; even layers sliding-window
    # (load_swa_pattern(2)), same base unless rope.freq_base_swa; attention sinks; MoE with top-k by
    # logit and a softmax over the chosen (SOFTMAX_WEIGHT), SwiGLU-OAI experts (alpha 1.702, limit 7).
    "gpt-oss": ArchSpec("gpt-oss", rope_neox=True, layer_tensors=_gpt_oss_layer(), moe=_GPT_OSS_MOE,
                        swa_pattern=2, ffn_norm="post_attention_norm.weight", swa_rope_scaled=True),
}

# Mixtral: the llama architecture with expert_count > 0 (llama.cpp's llama graph calls build_moe_ffn
# with norm_w true); recognised by its expert tensors.
_LLAMA_MOE = dataclasses.replace(ARCHS["llama"], moe=_MIXTRAL_MOE, layer_tensors=_layer(moe=_MIXTRAL_MOE))


# Phi-3 files whose converter kept q, k and v apart (llama.cpp loads attn_qkv when present, else these).
_PHI3_SEPARATE_QKV = dataclasses.replace(ARCHS["phi3"], layer_tensors=_layer(qkv_bias="none", fused_gate_up=True))


def _fused_gate_up_exps(spec: ArchSpec) -> ArchSpec:
    """spec with every expert's gate and up rows in one ffn_gate_up_exps tensor (gate rows first)."""
    roles, fused = [], _t("ffn_gate_up_exps.weight", lambda c: (c.n_embd, 2 * c.n_ff_exp, c.n_expert),
                          "exp_gate_up_rows")
    for r in spec.layer_tensors:
        if r.suffix == "ffn_gate_exps.weight":
            roles.append(fused)
        elif r.suffix != "ffn_up_exps.weight":
            roles.append(r)
    return dataclasses.replace(spec, layer_tensors=tuple(roles))


def arch_spec(name: str, tensor_names=()) -> ArchSpec:
    """The spec of architecture `name`; `tensor_names` picks between layouts one architecture allows."""
    spec = _arch_spec(name, tensor_names)
    if spec.moe is not None and "blk.0.ffn_gate_up_exps.weight" in tensor_names:
        if any(r.split == "exp_bias" for r in spec.layer_tensors):
            raise UnsupportedError(f"ffn_gate_up_exps in a {name} file: its expert biases would need the fused "
                                   "layout too; convert the model again with separate gate and up experts")
        return _fused_gate_up_exps(spec)
    return spec


def _arch_spec(name: str, tensor_names=()) -> ArchSpec:
    if name == "phi3" and "blk.0.attn_q.weight" in tensor_names and "blk.0.attn_qkv.weight" not in tensor_names:
        return _PHI3_SEPARATE_QKV
    if name == "llama" and ("blk.0.ffn_gate_exps.weight" in tensor_names or
                            "blk.0.ffn_gate_up_exps.weight" in tensor_names):
        return _LLAMA_MOE
    try:
        return ARCHS[name]
    except KeyError:
        raise UnsupportedError(f"architecture '{name}' (general.architecture) is not supported; "
                               f"supported: {', '.join(sorted(ARCHS))}") from None

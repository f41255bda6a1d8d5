"""Model configuration read from GGUF metadata (never from the file name).

One dataclass, `ModelConfig`, holds what every supported architecture family needs; the
per-architecture conventions (rope layout, norms, activation) live in `arch.py` and are
looked up by `general.architecture`. `check_tensors` compares the config with the tensor
table and names both numbers when they disagree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

from ..errors import ConfigError, UnsupportedError
from .arch import ArchSpec, arch_spec


@dataclass(frozen=True)
class RopeScaling:
    kind: str = "none"          # "none" | "linear" | "yarn"; llama3-style scaling arrives as the rope_freqs tensor
    factor: float = 1.0         # positions are divided by this for "linear" (and interpolated dims of "yarn")
    original_context: int = 0   # training context before scaling; LongRoPE picks its factors by it, YaRN
                                # its ramp between interpolated and extrapolated dims
    attn_factor: float = 1.0    # {arch}.rope.scaling.attn_factor: cos and sin are multiplied by it (LongRoPE)
    beta_fast: float = 32.0     # YaRN's ramp ends (llama.cpp's defaults; the converters write no key)
    beta_slow: float = 1.0
    ext_factor: float | None = None         # --yarn-ext-factor: how much of YaRN's ramp applies (None: 1 for yarn)
    yarn_attn_factor: float | None = None   # --yarn-attn-factor: cos and sin's factor where ext_factor is 0

    @property
    def freq_scale(self) -> float:
        """What the rotation angles are multiplied by (llama.cpp's rope_freq_scale)."""
        return 1.0 / self.factor if self.kind in ("linear", "yarn") and self.factor else 1.0

    @property
    def ext(self) -> float:
        """YaRN's extrapolation mix (llama.cpp's yarn_ext_factor): dimension pair i mixes in ramp_i * ext of
        the unscaled angle; 0 turns YaRN's ramp off."""
        return self.ext_factor if self.ext_factor is not None else (1.0 if self.kind == "yarn" else 0.0)

    @property
    def mscale(self) -> float:
        """What cos and sin are multiplied by, as llama.cpp's context and ggml's rope_yarn combine it: with a
        YaRN ramp (ext != 0), 1 + 0.1 ln(factor) for a factor above 1; else --yarn-attn-factor (default 1);
        either times the file's attn_factor."""
        factor = 1.0 / self.freq_scale
        if self.ext:
            return self.attn_factor * (1.0 + 0.1 * math.log(factor) if factor > 1.0 else 1.0)
        return self.attn_factor * (1.0 if self.yarn_attn_factor is None else self.yarn_attn_factor)


def with_rope_options(cfg: "ModelConfig", rope_scaling: str | None = None, rope_scale: float | None = None,
                      rope_freq_base: float | None = None, rope_freq_scale: float | None = None,
                      yarn_orig_ctx: int | None = None, yarn_ext_factor: float | None = None,
                      yarn_attn_factor: float | None = None, yarn_beta_fast: float | None = None,
                      yarn_beta_slow: float | None = None) -> "ModelConfig":
    """cfg with the run's rope flags (llama.cpp's --rope-scaling, --rope-scale, --rope-freq-base,
    --rope-freq-scale, --yarn-*) over the file's values; None keeps the file's. --rope-freq-scale s is
    --rope-scale 1/s. The base applies to the global layers (sliding ones keep their own, as llama.cpp's)."""
    sc = cfg.rope_scaling
    kind = rope_scaling or sc.kind
    if kind not in ("none", "linear", "yarn"):
        raise ConfigError(f"--rope-scaling {kind!r}: expected none, linear or yarn")
    factor = sc.factor
    if rope_freq_scale is not None:
        if rope_freq_scale <= 0:
            raise ConfigError(f"--rope-freq-scale {rope_freq_scale}: expected a positive scale")
        factor = 1.0 / rope_freq_scale
    if rope_scale is not None:
        if rope_scale <= 0:
            raise ConfigError(f"--rope-scale {rope_scale}: expected a positive factor")
        factor = rope_scale
    original = yarn_orig_ctx or sc.original_context or (cfg.n_ctx_train if kind == "yarn" else 0)
    for name, v in (("--yarn-beta-fast", yarn_beta_fast), ("--yarn-beta-slow", yarn_beta_slow),
                    ("--yarn-ext-factor", yarn_ext_factor), ("--yarn-attn-factor", yarn_attn_factor)):
        if v is not None and v < 0:
            raise ConfigError(f"{name} {v}: expected a value of 0 or more")
    scaling = replace(sc, kind=kind, factor=factor, original_context=original,
                      beta_fast=sc.beta_fast if yarn_beta_fast is None else yarn_beta_fast,
                      beta_slow=sc.beta_slow if yarn_beta_slow is None else yarn_beta_slow,
                      ext_factor=sc.ext_factor if yarn_ext_factor is None else yarn_ext_factor,
                      yarn_attn_factor=sc.yarn_attn_factor if yarn_attn_factor is None else yarn_attn_factor)
    if rope_freq_base is not None and rope_freq_base <= 0:
        raise ConfigError(f"--rope-freq-base {rope_freq_base}: expected a positive base")
    return replace(cfg, rope_scaling=scaling, rope_base=cfg.rope_base if rope_freq_base is None else rope_freq_base)


@dataclass(frozen=True)
class ModelConfig:
    arch: str                   # general.architecture, e.g. "llama"
    n_layers: int               # {arch}.block_count
    n_embd: int                 # {arch}.embedding_length: the residual width
    n_ff: int                   # {arch}.feed_forward_length: the MLP's hidden width
    n_heads: int                # {arch}.attention.head_count: query heads
    n_kv_heads: int             # {arch}.attention.head_count_kv: key/value heads (GQA); = n_heads when absent
    head_dim: int               # {arch}.attention.key_length, else n_embd // n_heads
    rope_base: float            # {arch}.rope.freq_base
    rope_dim: int               # {arch}.rope.dimension_count: how many dims of each head are rotated
    rope_scaling: RopeScaling
    rms_eps: float              # {arch}.attention.layer_norm_rms_epsilon
    n_ctx_train: int            # {arch}.context_length
    vocab_size: int             # rows of token_embd
    tied_output: bool           # True when output.weight is absent and token_embd serves as the output layer
    has_rope_freqs: bool        # rope_freqs.weight present (llama3-style per-frequency factors)
    rope_long_short: bool = False   # rope_factors_long/short present (Phi-3 LongRoPE): long past original_context
    swa_window: int = 0             # {arch}.attention.sliding_window: local layers see the last this many positions
    swa_layers: tuple[bool, ...] = ()   # per layer: True = sliding-window (local) layer; empty = none
    rope_base_swa: float = 0.0      # rope base of the local layers ({arch}.rope.freq_base_swa, else the arch's)
    n_expert: int = 0               # {arch}.expert_count: experts per MoE layer (0: a dense FFN)
    n_expert_used: int = 0          # {arch}.expert_used_count: experts each token is routed to
    n_ff_exp: int = 0               # {arch}.expert_feed_forward_length (else feed_forward_length): an expert's width
    n_ff_shexp: int = 0             # {arch}.expert_shared_feed_forward_length: the shared expert's width
    spec: ArchSpec = field(repr=False, compare=False, default=None)  # per-architecture conventions

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def attn_scale(self) -> float:
        """Softmax scale of q.k (1/sqrt(head_dim) unless the architecture says otherwise)."""
        return self.spec.attn_scale(self)

    def is_swa(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per layer: the sliding window, or 0 for a global layer (the KV cache's `windows`)."""
        return tuple(self.swa_window if self.is_swa(i) else 0 for i in range(self.n_layers))

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def _get(kv: Mapping[str, object], key: str, default=None, required: bool = True):
    if key in kv:
        return kv[key]
    if required and default is None:
        raise ConfigError(f"metadata key '{key}' is missing")
    return default


def config_from_gguf(kv: Mapping[str, object], tensors: Mapping[str, object]) -> ModelConfig:
    """Build the config from metadata `kv` and the tensor table `tensors` (name -> TensorInfo)."""
    arch = _get(kv, "general.architecture")
    spec = arch_spec(str(arch), tensors)  # raises UnsupportedError for unknown architectures
    a = f"{arch}."
    n_embd = int(_get(kv, a + "embedding_length"))
    n_heads = int(_get(kv, a + "attention.head_count"))
    if n_heads <= 0:
        raise ConfigError(f"'{a}attention.head_count' is {n_heads}; expected a positive head count")
    n_kv_heads = int(_get(kv, a + "attention.head_count_kv", n_heads))
    if n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ConfigError(f"'{a}attention.head_count' {n_heads} is not a multiple of "
                          f"'{a}attention.head_count_kv' {n_kv_heads}")
    head_dim = int(_get(kv, a + "attention.key_length", n_embd // n_heads))
    v_dim = int(_get(kv, a + "attention.value_length", head_dim))
    if v_dim != head_dim:
        raise ConfigError(f"'{a}attention.value_length' {v_dim} differs from key_length {head_dim}; not supported")
    scaling_kind = str(_get(kv, a + "rope.scaling.type", "none"))
    if scaling_kind not in ("none", "linear", "yarn"):
        raise UnsupportedError(f"'{a}rope.scaling.type' = {scaling_kind!r} is not supported; supported: none, linear, "
                               "yarn (llama3-style scaling is read from the rope_freqs tensor)")
    if float(_get(kv, a + "rope.scaling.yarn_log_multiplier", 0.0)):
        raise UnsupportedError(f"'{a}rope.scaling.yarn_log_multiplier' (DeepSeek's YaRN variant) is not supported")
    scaling = RopeScaling(
        kind=scaling_kind,
        factor=float(_get(kv, a + "rope.scaling.factor", 1.0)),
        original_context=int(_get(kv, a + "rope.scaling.original_context_length",
                                   _get(kv, a + "context_length", 2048) if scaling_kind == "yarn" else 0)),
        attn_factor=float(_get(kv, a + "rope.scaling.attn_factor", 1.0)),
    )
    if "token_embd.weight" not in tensors:
        raise ConfigError("tensor 'token_embd.weight' is missing")
    vocab_size = int(tensors["token_embd.weight"].shape[1])
    n_layers = int(_get(kv, a + "block_count"))
    rope_base = float(_get(kv, a + "rope.freq_base", 10000.0))
    swa_window, swa_layers = 0, ()
    if spec.swa_pattern:
        # llama.cpp's set_swa_pattern(n): layer i is local unless i % n == n - 1
        swa_window = int(_get(kv, a + "attention.sliding_window"))
        if swa_window <= 0:
            raise ConfigError(f"'{a}attention.sliding_window' is {swa_window}; expected a positive window")
        swa_layers = tuple(i % spec.swa_pattern < spec.swa_pattern - 1 for i in range(n_layers))
    long_short = [f"rope_factors_{k}.weight" in tensors for k in ("long", "short")]
    if any(long_short) and not all(long_short):
        raise ConfigError("rope_factors_long.weight and rope_factors_short.weight come as a pair; "
                          f"the file has only {'rope_factors_long' if long_short[0] else 'rope_factors_short'}")
    n_ff = int(_get(kv, a + "feed_forward_length"))
    moe = _moe_fields(kv, a, spec, n_ff)
    cfg = ModelConfig(
        arch=str(arch),
        n_layers=n_layers,
        n_embd=n_embd,
        n_ff=n_ff,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rope_base=rope_base,
        rope_dim=int(_get(kv, a + "rope.dimension_count", head_dim)),
        rope_scaling=scaling,
        rms_eps=float(_get(kv, a + "attention.layer_norm_rms_epsilon")),
        n_ctx_train=int(_get(kv, a + "context_length", 2048)),
        vocab_size=vocab_size,
        tied_output="output.weight" not in tensors,
        has_rope_freqs="rope_freqs.weight" in tensors,
        rope_long_short=all(long_short),
        swa_window=swa_window,
        swa_layers=swa_layers,
        rope_base_swa=float(_get(kv, a + "rope.freq_base_swa", spec.rope_base_swa or rope_base)),
        **moe,
        spec=spec,
    )
    declared_vocab = kv.get(a + "vocab_size")
    if declared_vocab is not None and int(declared_vocab) != vocab_size:
        raise ConfigError(f"'{a}vocab_size' is {declared_vocab} but token_embd.weight has {vocab_size} rows")
    check_tensors(cfg, tensors)
    return cfg


def _moe_fields(kv: Mapping[str, object], a: str, spec: ArchSpec, n_ff: int) -> dict:
    """The expert counts and widths, as llama.cpp reads them for the arch (llama-model.cpp load_hparams)."""
    n_expert = int(_get(kv, a + "expert_count", 0))
    if spec.moe is None:
        if n_expert:
            raise UnsupportedError(f"'{a}expert_count' is {n_expert} but the file has no expert tensors "
                                   "(blk.N.ffn_gate_exps.weight); per-expert 2-D tensors of old converters are "
                                   "not supported: convert the model again")
        return {}
    used = int(_get(kv, a + "expert_used_count"))
    if n_expert <= 0 or not 0 < used <= n_expert:
        raise ConfigError(f"'{a}expert_count' {n_expert} and '{a}expert_used_count' {used}: expected "
                          "0 < expert_used_count <= expert_count")
    fields = dict(n_expert=n_expert, n_expert_used=used,
                  n_ff_exp=int(_get(kv, a + "expert_feed_forward_length", n_ff)))
    if spec.moe.shared_expert:
        fields["n_ff_shexp"] = int(_get(kv, a + "expert_shared_feed_forward_length"))
    return fields


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the architecture needs, with its ggml shape (ne0 = input dim first)."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (cfg.n_embd, cfg.vocab_size),
        "output_norm.weight": (cfg.n_embd,),
    }
    if not cfg.tied_output:
        shapes["output.weight"] = (cfg.n_embd, cfg.vocab_size)
    for role in cfg.spec.global_tensors:
        shapes[role.suffix] = role.shape(cfg)
    for i in range(cfg.n_layers):
        shapes.update(cfg.spec.layer_shapes(cfg, i))
    return shapes


def check_tensors(cfg: ModelConfig, tensors: Mapping[str, object]) -> None:
    """Every expected tensor exists with the expected shape; no tensor is left unexplained."""
    expected = expected_shapes(cfg)
    optional = cfg.spec.optional_tensors(cfg)
    for name, shape in expected.items():
        if name not in tensors:
            if name in optional:
                continue
            raise ConfigError(f"tensor '{name}' is missing (the {cfg.arch} architecture with "
                              f"{cfg.n_layers} layers needs it)")
        got = tuple(int(d) for d in tensors[name].shape)
        if got != shape:
            raise ConfigError(f"tensor '{name}' has shape {list(got)} but the metadata implies {list(shape)} "
                              f"(n_embd={cfg.n_embd}, n_ff={cfg.n_ff}, n_heads={cfg.n_heads}, "
                              f"n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}, vocab={cfg.vocab_size}"
                              + (f", n_expert={cfg.n_expert}, n_ff_exp={cfg.n_ff_exp}" if cfg.n_expert else "") + ")")
    unknown = [n for n in tensors if n not in expected]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        model_level = ["token_embd.weight", "output_norm.weight", "output.weight"]
        model_level += [r.suffix for r in cfg.spec.global_tensors]
        raise UnsupportedError(
            f"{len(unknown)} tensor(s) the {cfg.arch} architecture does not use: {shown}; supported: "
            f"{', '.join(model_level)} and per layer blk.N.{{{', '.join(r.suffix for r in cfg.spec.layer_tensors)}}}")

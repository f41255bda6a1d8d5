"""Synthetic GGUF files that llama.cpp and tensorsplit both read: the models and vocabularies
behind the llama.cpp goldens for architectures and pre-tokenizers that have no real model here.

scripts/make_golden.py writes each file from its entry below, has llama.cpp run it, and records
the file's sha256 with the outputs; the tests rebuild the file from the same entry and first
check that its sha256 is the one llama.cpp saw. Every file is a pure function of its entry, a
seed, gguf-py's writer and quantizers, and SmolLM2's GGUF (whose tokenizer every file copies:
its 49,152-token byte-level BPE vocabulary, merges and special tokens, so that the fixture text
tokenizes as real English).

Architecture files (ARCH_MODELS) are laid out as llama.cpp's converter writes each arch (see
tests/synthetic.py), with 2 layers, head_dim >= 32, untied output, and weights at a fan-in
scale (init="fan_in"), so that logits have a spread of ~3.5 and attention is not uniform. Their
quant types mix what llama.cpp computes by different paths (F32, F16, Q8_0, Q4_0..Q5_1 through
8-bit activations, K-quants through Q8_K activations).
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType as V, GGUFWriter, GGMLQuantizationType as Q

from synthetic import write_model

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256(path: Path) -> str:
    """sha256 hex of a file; remembered per (path, size, mtime), as the real models are hashed by
    several tests."""
    st = Path(path).stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=2)
def _tokenizer_fields(smollm2_path: str) -> tuple:
    out = []
    for key, f in GGUFReader(smollm2_path).fields.items():
        if key.startswith("tokenizer."):
            value = f.contents()
            out.append((key, tuple(value) if isinstance(value, list) else value, f.types[0], f.types[-1]))
    return tuple(out)


def tokenizer_items(smollm2_path: Path, pre: str | None = None, drop=(), extra_merges=()) -> list[tuple]:
    """SmolLM2's tokenizer.* metadata as (key, value, type[, array sub-type]) in file order;
    `pre` replaces tokenizer.ggml.pre, keys in `drop` are left out, and each of `extra_merges`
    ("a b") is appended to the merges (last, so least preferred) with its token "ab" (normal)."""
    extra = {"tokenizer.ggml.merges": list(extra_merges),
             "tokenizer.ggml.tokens": [m.replace(" ", "") for m in extra_merges],
             "tokenizer.ggml.token_type": [1] * len(extra_merges)}
    items = []
    for key, value, vtype, sub in _tokenizer_fields(str(smollm2_path)):
        if key in drop:
            continue
        if key == "tokenizer.ggml.pre" and pre is not None:
            value = pre
        if vtype == V.ARRAY:
            items.append((key, list(value) + extra.get(key, []), V.ARRAY, sub))
        else:
            items.append((key, value, vtype))
    return items


def llama3_rope_factors(rope_dim: int, base: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_context: int) -> np.ndarray:
    """Llama 3.1's per-frequency rope scaling as the GGUF converter stores it (rope_freqs.weight):
    frequencies whose wavelength is below original/high_freq_factor are kept (1), those above
    original/low_freq_factor divided by `factor`, those between by a smooth blend of the two."""
    out = []
    for i in range(0, rope_dim, 2):
        wavelen = 2 * math.pi * base ** (i / rope_dim)
        if wavelen < original_context / high_freq_factor:
            out.append(1.0)
        elif wavelen > original_context / low_freq_factor:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@dataclass(frozen=True)
class ArchModel:
    arch: str               # general.architecture
    kw: dict                # write_model's arguments
    top_ctx: tuple = (256,)  # llama.cpp contexts for the prompts' top logits
    ppl_ctx: tuple = (256,)  # llama.cpp contexts for perplexity on english.txt
    note: str = ""
    extra_tensors: dict = field(default_factory=dict)   # name -> float32 array
    pre: str | None = None  # tokenizer.ggml.pre in place of SmolLM2's


# Phi-3 LongRoPE as Phi-3-mini-128k / Phi-4-mini write it: context_length past the original, and
# rope.scaling.attn_factor = sqrt(1 + ln(context / original) / ln(original)).
_PHI3_ORIGINAL, _PHI3_CONTEXT = 256, 512

ARCH_MODELS: dict[str, ArchModel] = {
    "qwen2": ArchModel("qwen2", dict(
        n_embd=256, n_heads=8, n_kv=2, n_ff=512, seed=11, rope_base=1e6, bias_scale=0.5,
        types={"token_embd": Q.Q8_0, "output": Q.Q6_K, "attn_q": Q.Q5_0, "attn_k": Q.Q8_0, "attn_v": Q.Q4_K,
               "attn_output": Q.F16, "ffn_gate": Q.Q4_0, "ffn_up": Q.Q5_K, "ffn_down": Q.Q8_0}),
        note="q/k/v biases, NeoX rope, GQA 8/2"),
    "qwen3": ArchModel("qwen3", dict(
        n_embd=128, n_heads=4, n_kv=2, head_dim=64, n_ff=384, seed=12, rope_base=1e6,
        types={"token_embd": Q.Q4_0, "output": Q.Q8_0, "attn_q": Q.F16, "attn_k": Q.Q8_0, "attn_v": Q.Q5_1,
               "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_1}),
        note="q/k RMSNorm, head_dim 64 != n_embd / n_heads"),
    "phi3-longrope": ArchModel("phi3", dict(
        n_embd=192, n_heads=6, n_kv=2, n_ff=384, seed=13, rope_dim=24, rope_factors=True,
        original_context=_PHI3_ORIGINAL, context_length=_PHI3_CONTEXT,
        attn_factor=math.sqrt(1 + math.log(_PHI3_CONTEXT / _PHI3_ORIGINAL) / math.log(_PHI3_ORIGINAL)),
        types={"token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_qkv": Q.Q5_0, "attn_output": Q.F32,
               "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0}),
        top_ctx=(_PHI3_ORIGINAL, _PHI3_CONTEXT), ppl_ctx=(_PHI3_ORIGINAL, _PHI3_CONTEXT),
        note="fused qkv and gate|up, partial rotary (24 of 32), LongRoPE: short factors at n_ctx 256, "
             "long at 512"),
    "llama3-rope-freqs": ArchModel("llama", dict(
        n_embd=128, n_heads=4, n_kv=2, n_ff=256, seed=14, rope_base=10000.0,
        types={"token_embd": Q.Q8_0, "output": Q.Q5_1, "attn_q": Q.Q4_0, "attn_k": Q.F16, "attn_v": Q.Q8_0,
               "attn_output": Q.Q5_0, "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_0, "ffn_down": Q.F16}),
        extra_tensors={"rope_freqs.weight": llama3_rope_factors(32, 10000.0, 8.0, 1.0, 4.0, 64)},
        note="llama3 rope scaling (rope_freqs: factor 8, low/high 1/4, original context 64, so that it "
             "bites within 256 positions), normal rope layout"),
    "llama-linear": ArchModel("llama", dict(
        n_embd=64, n_heads=2, n_kv=1, n_ff=192, seed=15, rope_base=10000.0, context_length=1024,
        extra_kv={"llama.rope.scaling.type": ("linear", V.STRING), "llama.rope.scaling.factor": (4.0, V.FLOAT32)},
        types={"token_embd": Q.F16, "output": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "attn_v": Q.F32,
               "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q5_0, "ffn_down": Q.Q8_0}),
        note="linear rope scaling (factor 4), 2 heads / 1 KV head of 32"),
    # mixtures of experts: the router F32 (as llama.cpp's quantize keeps it), experts 3-D
    "qwen3moe": ArchModel("qwen3moe", dict(
        n_embd=256, n_heads=4, n_kv=2, head_dim=64, n_ff=512, seed=16, rope_base=1e6, n_expert=32,
        n_expert_used=8, n_ff_exp=256,
        types={"token_embd": Q.Q8_0, "output": Q.Q6_K, "attn_q": Q.Q8_0, "attn_k": Q.Q5_0, "attn_v": Q.Q8_0,
               "attn_output": Q.Q4_0, "ffn_gate_exps": Q.Q4_K, "ffn_up_exps": Q.Q5_0, "ffn_down_exps": Q.Q8_0}),
        note="32 experts, top 8, weights renormalised; q/k RMSNorm; K-quant expert rows"),
    "qwen2moe": ArchModel("qwen2moe", dict(
        n_embd=256, n_heads=8, n_kv=2, n_ff=512, seed=17, rope_base=1e6, bias_scale=0.5, n_expert=16,
        n_expert_used=4, n_ff_exp=128, n_ff_shexp=384,
        types={"token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "attn_v": Q.Q5_1,
               "attn_output": Q.Q8_0, "ffn_gate_exps": Q.Q4_0, "ffn_up_exps": Q.Q8_0, "ffn_down_exps": Q.Q4_1,
               "ffn_gate_shexp": Q.Q5_K, "ffn_up_shexp": Q.Q8_0, "ffn_down_shexp": Q.Q5_0}),
        note="16 experts, top 4, weights not renormalised; a shared expert (384) behind a sigmoid gate; "
             "q/k/v biases"),
    "mixtral": ArchModel("llama", dict(
        n_embd=256, n_heads=4, n_kv=2, n_ff=256, seed=18, rope_base=1e6, n_expert=8, n_expert_used=2,
        types={"token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_q": Q.Q4_K, "attn_k": Q.Q8_0, "attn_v": Q.Q8_0,
               "attn_output": Q.Q8_0, "ffn_gate_exps": Q.Q6_K, "ffn_up_exps": Q.IQ4_NL, "ffn_down_exps": Q.Q8_0}),
        note="Mixtral: the llama architecture with 8 experts, top 2, normal rope layout"),
    # gpt-oss-20b's per-layer layout at a small width: head_dim 64 with q_dim != n_embd, GQA 8/2, MXFP4
    # experts, its rope (base 150000, YaRN factor 32 over 4096) and a window that bites within 256
    "gpt-oss": ArchModel("gpt-oss", dict(
        n_embd=256, n_heads=8, n_kv=2, head_dim=64, n_ff=256, seed=19, rope_base=150000.0, n_expert=16,
        n_expert_used=4, n_ff_exp=256, window=48, bias_scale=0.3, context_length=131072,
        extra_kv={"gpt-oss.rope.scaling.type": ("yarn", V.STRING), "gpt-oss.rope.scaling.factor": (32.0, V.FLOAT32),
                  "gpt-oss.rope.scaling.original_context_length": (4096, V.UINT32)},
        types={"token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.F16, "attn_v": Q.Q8_0,
               "attn_output": Q.Q8_0, "ffn_gate_exps": Q.MXFP4, "ffn_up_exps": Q.MXFP4, "ffn_down_exps": Q.MXFP4}),
        pre="gpt-4o",
        note="gpt-oss: attention sinks, biases everywhere, even layers sliding (window 48), YaRN, 16 MXFP4 "
             "experts top 4 by logit with a softmax over the chosen, SwiGLU-OAI"),
}


def write_arch_model(name: str, path: Path, smollm2_path: Path) -> Path:
    m = ARCH_MODELS[name]
    return write_model(Path(path), m.arch, n_layers=2, vocab=49152, tied=False, init="fan_in",
                       kv_items=tokenizer_items(smollm2_path, m.pre), extra_tensors=m.extra_tensors, **m.kw)


# Pre-tokenizer vocabularies: SmolLM2's vocabulary and merges under another tokenizer.ggml.pre.
# "llama-bpe-no-add-bos" also drops add_bos_token, so that llama.cpp's llama3 default (add BOS) applies.
# SmolLM2 spells every number digit by digit (it has no merges of digits), so on its own vocabulary
# the pre-tokenizers' different digit rules (llama-bpe: runs of at most 3, qwen2: one digit, gpt-2:
# any run) give the same ids; three digit merges are added (tokens 49152-49154) so that they differ.
PRE_EXTRA_MERGES = ("1 2", "12 3", "4 5")
PRE_VOCABS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama-bpe": ("llama-bpe", ()),
    "llama-bpe-no-add-bos": ("llama-bpe", ("tokenizer.ggml.add_bos_token",)),
    "qwen2": ("qwen2", ()),
    "gpt-2": ("gpt-2", ()),
    "default": ("default", ()),
    "gpt-4o": ("gpt-4o", ()),
}


def write_vocab(name: str, path: Path, smollm2_path: Path) -> Path:
    """A vocabulary-only GGUF (llama hparams, no tensors) for llama.cpp's vocab_only load."""
    pre, drop = PRE_VOCABS[name]
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(32)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(49152 + len(PRE_EXTRA_MERGES))
    for key, value, vtype, *sub in tokenizer_items(smollm2_path, pre, drop, PRE_EXTRA_MERGES):
        w.add_key_value(key, value, vtype, *sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)

"""Write small GGUF models with gguf.GGUFWriter, for shapes and quant types the real files lack.

Weights are random. Types gguf-py can quantize go through `gguf.quants.quantize`; the others
(K-quants, IQ4) get random blocks with their float16 scale fields overwritten by small finite
values, so every format decodes to sane numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter, GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

# byte offsets of float16 scale fields inside one block, and the value range to write there
_F16_FIELDS = {
    Q.Q2_K: ((80, 82), 0.004), Q.Q3_K: ((108,), 0.004), Q.Q4_K: ((0, 2), 0.004),
    Q.Q5_K: ((0, 2), 0.002), Q.Q6_K: ((208,), 0.0005), Q.IQ4_NL: ((0,), 0.005), Q.IQ4_XS: ((0,), 0.002),
}


def random_quantized(qtype: Q, n_rows: int, n_cols: int, rng: np.random.Generator,
                     std: float = 0.05) -> np.ndarray:
    """(n_rows, row_bytes) uint8 blocks of `qtype`, or a float array for F32/F16/BF16-by-quantize.
    Values are N(0, std) before quantization; random blocks (K-quants, IQ4) have their own spread,
    which a `std` other than 0.05 rescales to about `std` (their float16 scales, and so every
    value, are multiplied by std / the spread measured on the random blocks)."""
    if qtype == Q.F32:
        return (rng.standard_normal((n_rows, n_cols)) * std).astype(np.float32)
    if qtype not in _F16_FIELDS:
        return quantize((rng.standard_normal((n_rows, n_cols)) * std).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_rows * n_cols // block, size), dtype=np.uint8)
    offsets, scale = _F16_FIELDS[qtype]
    vals = [(rng.uniform(0.5, 1.5, blocks.shape[0]) * scale).astype(np.float16) for _ in offsets]
    if std != 0.05:
        for off, v in zip(offsets, vals):
            blocks[:, off:off + 2] = v.view(np.uint8).reshape(-1, 2)
        spread = float(dequantize(blocks, qtype).std())
        vals = [(v.astype(np.float32) * (std / spread)).astype(np.float16) for v in vals]
    for off, v in zip(offsets, vals):
        blocks[:, off:off + 2] = v.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_rows, -1)


def write_llama(path: Path, **kw) -> Path:
    """A llama-architecture GGUF with random weights (see write_model)."""
    return write_model(path, "llama", **kw)


def write_model(path: Path, arch: str = "llama", *, n_layers=2, n_embd=256, n_heads=8, n_kv=2, n_ff=512,
                vocab=320, head_dim=None, types: dict[str, Q] | None = None, tied=True, seed=0,
                rope_base=10000.0, extra_kv: dict | None = None, window=4, rope_factors=False,
                bias_scale=0.5, original_context=32, rope_dim=None, fused_qkv=None,
                extra_tensors: dict[str, np.ndarray] | None = None, context_length=256,
                attn_factor=1.19, init="small", kv_items=(), n_expert=0, n_expert_used=2, n_ff_exp=None,
                n_ff_shexp=None) -> Path:
    """A GGUF of `arch` with random weights, laid out as llama.cpp's converter writes that arch:

    llama   q, k, v, o, gate, up, down
    qwen2   + q/k/v biases (bias_scale std, so they matter)
    qwen3   + attn_q_norm / attn_k_norm (head_dim), no biases
    phi3    fused attn_qkv = [q; k; v] and ffn_up = [gate; up] (no ffn_gate); with rope_factors,
            LongRoPE's rope_factors_long/short, rope.scaling.attn_factor and `original_context`
    gemma3  + q/k norms, post_attention_norm, post_ffw_norm; attention.sliding_window = `window`
    qwen3moe  qwen3's attention; every FFN `n_expert` experts of width n_ff_exp (3-D ffn_*_exps),
            routed by ffn_gate_inp (F32) to n_expert_used of them
    qwen2moe  qwen2's attention (biases); experts as qwen3moe, and a shared expert of n_ff_shexp
            (ffn_*_shexp) with its gate vector ffn_gate_inp_shexp
    llama with n_expert > 0: Mixtral (experts of width n_ff, expert_feed_forward_length not written)
    gpt-oss   q/k/v/o biases, attn_sinks (one logit per head, N(0, 1)), post_attention_norm as the FFN
            norm, sliding window `window` on even layers; experts as qwen3moe with a router bias and
            gate/up/down expert biases (bias_scale std); YaRN metadata through extra_kv

    `types` maps a tensor suffix ("attn_q", "attn_qkv", "ffn_down", "token_embd", "output", ...) to
    its quant type; default Q8_0. Norm weights are 1 + 0.1 N(0, 1) (gemma's stored +1 included).
    rope_dim: rotated dims per head (partial rotary, as Phi-4-mini); default head_dim.
    extra_tensors: name -> float32 array, written as well (for unknown-tensor tests).
    fused_qkv: False writes a phi3 file with separate attn_q/k/v (llama.cpp loads either).
    init: "small" draws every matrix N(0, 0.05); "fan_in" draws token_embd N(0, 1), output
    N(0, 3.5 / sqrt(n_embd)) (logits of std ~3.5: a peaked, non-degenerate distribution) and every
    other matrix N(0, 1 / sqrt(its input width)), so that each layer's output is O(1) like its input;
    norm weights are 1 + 0.3 N(0, 1), far enough from 1 that ignoring one shows.
    kv_items: (key, value, GGUFValueType[, array sub-type]) written after the arch's metadata (a
    tokenizer copied from a real file, for instance)."""
    rng = np.random.default_rng(seed)
    types = types or {}
    hd = head_dim or n_embd // n_heads
    w = GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(rope_dim or hd)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(1e-5 if arch != "gemma3" else 1e-6)
    if arch in ("gemma3", "gpt-oss"):
        w.add_sliding_window(window)
    moe = n_expert > 0
    if moe:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        if arch != "llama":
            w.add_expert_feed_forward_length(n_ff_exp or n_ff)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(n_ff_shexp or n_ff)
    if rope_factors:
        w.add_rope_scaling_attn_factors(attn_factor)
        w.add_rope_scaling_orig_ctx_len(original_context)
    for k, v in (extra_kv or {}).items():
        w.add_key_value(k, v[0], v[1])
    for key, value, vtype, *sub in kv_items:
        w.add_key_value(key, value, vtype, *sub)

    def std_of(suffix, n_cols):
        if init == "small":
            return 0.05
        assert init == "fan_in", init
        return {"token_embd": 1.0, "output": 3.5 / n_embd ** 0.5}.get(suffix, 1.0 / n_cols ** 0.5)

    def tensor(name, suffix, n_rows, n_cols):
        qtype = types.get(suffix, Q.Q8_0)
        data = random_quantized(qtype, n_rows, n_cols, rng, std_of(suffix, n_cols))
        if qtype == Q.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=(n_rows, n_cols) if data.dtype != np.uint8
                         else data.shape, raw_dtype=qtype)

    def experts(name, suffix, n_rows, n_cols):
        """A 3-D expert tensor: n_expert matrices of (n_rows, n_cols), ggml [n_cols, n_rows, n_expert]."""
        qtype = types.get(suffix, Q.Q8_0)
        data = random_quantized(qtype, n_expert * n_rows, n_cols, rng, std_of(suffix, n_cols))
        data = data.reshape(n_expert, n_rows, -1)
        if qtype == Q.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=(n_expert, n_rows, n_cols) if data.dtype != np.uint8
                         else data.shape, raw_dtype=qtype)

    def vector(name, n, mean=1.0, std=0.1 if init == "small" else 0.3):
        w.add_tensor(name, (mean + std * rng.standard_normal(n)).astype(np.float32))

    q_dim, kv_dim = n_heads * hd, n_kv * hd
    tensor("token_embd.weight", "token_embd", vocab, n_embd)
    if not tied:
        tensor("output.weight", "output", vocab, n_embd)
    vector("output_norm.weight", n_embd)
    if rope_factors:
        vector("rope_factors_long.weight", (rope_dim or hd) // 2, mean=4.0, std=1.0)
        vector("rope_factors_short.weight", (rope_dim or hd) // 2, mean=1.0, std=0.05)
    for i in range(n_layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", n_embd)
        if arch == "phi3" and fused_qkv is not False:
            tensor(p + "attn_qkv.weight", "attn_qkv", q_dim + 2 * kv_dim, n_embd)
        else:
            tensor(p + "attn_q.weight", "attn_q", q_dim, n_embd)
            tensor(p + "attn_k.weight", "attn_k", kv_dim, n_embd)
            tensor(p + "attn_v.weight", "attn_v", kv_dim, n_embd)
        if arch in ("qwen2", "qwen2moe", "gpt-oss"):
            for t, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                vector(p + f"attn_{t}.bias", n, mean=0.0, std=bias_scale)
        if arch in ("qwen3", "gemma3", "qwen3moe"):
            vector(p + "attn_q_norm.weight", hd)
            vector(p + "attn_k_norm.weight", hd)
        tensor(p + "attn_output.weight", "attn_output", n_embd, q_dim)
        if arch == "gpt-oss":
            vector(p + "attn_output.bias", n_embd, mean=0.0, std=bias_scale)
            vector(p + "attn_sinks.weight", n_heads, mean=0.0, std=1.0)
        if arch in ("gemma3", "gpt-oss"):
            vector(p + "post_attention_norm.weight", n_embd)
        if arch != "gpt-oss":
            vector(p + "ffn_norm.weight", n_embd)
        if moe:
            ff = n_ff_exp or n_ff
            w.add_tensor(p + "ffn_gate_inp.weight",      # the router: F32, as llama.cpp's quantize keeps it
                         (rng.standard_normal((n_expert, n_embd)) * std_of("ffn_gate_inp", n_embd)).astype(np.float32))
            experts(p + "ffn_gate_exps.weight", "ffn_gate_exps", ff, n_embd)
            experts(p + "ffn_up_exps.weight", "ffn_up_exps", ff, n_embd)
            experts(p + "ffn_down_exps.weight", "ffn_down_exps", n_embd, ff)
            if arch == "gpt-oss":
                vector(p + "ffn_gate_inp.bias", n_expert, mean=0.0, std=bias_scale)
                for name, width in (("ffn_gate_exps", ff), ("ffn_up_exps", ff), ("ffn_down_exps", n_embd)):
                    w.add_tensor(p + name + ".bias",       # ggml [width, n_expert]
                                 (bias_scale * rng.standard_normal((n_expert, width))).astype(np.float32))
            if arch == "qwen2moe":
                sh = n_ff_shexp or n_ff
                vector(p + "ffn_gate_inp_shexp.weight", n_embd, mean=0.0, std=std_of("ffn_gate_inp_shexp", n_embd))
                tensor(p + "ffn_gate_shexp.weight", "ffn_gate_shexp", sh, n_embd)
                tensor(p + "ffn_up_shexp.weight", "ffn_up_shexp", sh, n_embd)
                tensor(p + "ffn_down_shexp.weight", "ffn_down_shexp", n_embd, sh)
        elif arch == "phi3":
            tensor(p + "ffn_up.weight", "ffn_up", 2 * n_ff, n_embd)
        else:
            tensor(p + "ffn_gate.weight", "ffn_gate", n_ff, n_embd)
            tensor(p + "ffn_up.weight", "ffn_up", n_ff, n_embd)
        if not moe:
            tensor(p + "ffn_down.weight", "ffn_down", n_embd, n_ff)
        if arch == "gemma3":
            vector(p + "post_ffw_norm.weight", n_embd)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def fuse_gate_up_exps(src: Path, dst: Path) -> Path:
    """A copy of the mixture-of-experts file `src` with every layer's ffn_gate_exps and ffn_up_exps
    written as one ffn_gate_up_exps [n_embd, 2 n_ff_exp, n_expert], each expert's gate rows first (the
    layout llama.cpp's create_tensor_gate_up_exps loads); everything else byte for byte."""
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)
    tensors = {t.name: t for t in r.tensors}
    for t in r.tensors:
        if t.name.endswith("ffn_up_exps.weight"):
            continue
        data = np.asarray(t.data)
        if t.name.endswith("ffn_gate_exps.weight"):
            up = np.asarray(tensors[t.name.replace("gate_exps", "up_exps")].data)
            data = np.concatenate([data, up], axis=1)              # (n_expert, 2 n_ff_exp, row bytes)
            w.add_tensor(t.name.replace("gate_exps", "gate_up_exps"), data, raw_shape=data.shape,
                         raw_dtype=t.tensor_type)
        elif t.tensor_type in (Q.F32, Q.F16):
            w.add_tensor(t.name, data)
        else:
            w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)

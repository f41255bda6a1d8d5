#!/usr/bin/env python3
"""Write the synthetic speed subjects: a TinyLlama-shaped 1.1B llama model with random weights, and
mixtures of experts with real per-layer shapes.

    .venv/bin/python scripts/make_bench_models.py [--out DIR] [--llama-py /work/refvenv/bin/python]
    .venv/bin/python scripts/make_bench_models.py --shape llama3-8b --no-tokenizer --out DIR   # GPU check
    .venv/bin/python scripts/make_bench_models.py --shape qwen3-30b-a3b [--layers 6]
      -> qwen3-30b-a3b-6l-random.Q4_K_M.gguf: Qwen3-30B-A3B's layer (n_embd 2048, 32 heads / 4 KV
         heads of 128, 128 experts of 768, top 8) with Q4_K_M's types, 6 of its 48 layers, SmolLM2's
         vocabulary (49152) unless --no-tokenizer (then its own 151936)
    .venv/bin/python scripts/make_bench_models.py --shape gpt-oss-20b [--layers 6]
      -> gpt-oss-20b-6l-random.MXFP4.gguf: gpt-oss-20b's layer (n_embd 2880, 64 heads / 8 KV heads of
         64, 32 experts of 2880, top 4, sinks, biases, window 128 on even layers, YaRN) with MXFP4
         experts and Q8_0 for every other matrix, 6 of its 24 layers; SmolLM2's vocabulary unless
         --no-tokenizer (then its own 201088)

Files written into DIR (default: the tensorsplit model cache, $TENSORSPLIT_CACHE or
~/.cache/tensorsplit):
  tinyllama-1.1b-random.Q4_0.gguf     every 2-D weight Q4_0 but the output layer (Q6_K, as llama.cpp's
                                      quantizer leaves it), random blocks written by gguf-py
  tinyllama-1.1b-random.Q4_K_M.gguf   the same shape quantized by llama.cpp's own quantizer
                                      (llama_model_quantize, type Q4_K_M) from an F16 file; only when
                                      a Python with llama-cpp-python is given (--llama-py), or
                                      with llama-quantize (--llama-quantize PATH)

Shape: 22 layers, n_embd 2048, 32 heads, 4 KV heads, n_ff 5632 (TinyLlama 1.1B). The tokenizer is
SmolLM2's (so the vocabulary has 49152 entries instead of TinyLlama's 32000); the weights are random
and only the speed of these files means anything. --no-tokenizer writes no tokenizer (the shape's own
vocabulary size; enough for `bench`, which feeds random token ids) and needs no SmolLM2 file, for a
machine that cannot fetch one; --shape llama3-8b writes a Llama-3-8B-shaped Q4_0 file (about 4.3 GiB).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType, GGUFWriter, RopeScalingType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tensorsplit import models  # noqa: E402



@dataclass(frozen=True)
class Shape:
    name: str
    n_layers: int
    n_embd: int
    n_heads: int
    n_kv: int
    n_ff: int
    n_vocab: int          # without a copied tokenizer


SHAPES = {s.name: s for s in (Shape("tinyllama-1.1b", 22, 2048, 32, 4, 5632, 32000),
                              Shape("llama3-8b", 32, 4096, 32, 8, 14336, 128256))}


@dataclass(frozen=True)
class MoeShape:
    name: str
    arch: str
    n_layers: int         # the real model's; --layers writes fewer
    n_embd: int
    n_heads: int
    n_kv: int
    head_dim: int
    n_ff: int             # the dense width the metadata declares
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_vocab: int
    quant: str = "Q4_K_M"  # the file's type mix, in its name


MOE_SHAPES = {s.name: s for s in (MoeShape("qwen3-30b-a3b", "qwen3moe", 48, 2048, 32, 4, 128, 6144, 128, 8, 768,
                                           151936),
                                  MoeShape("gpt-oss-20b", "gpt-oss", 24, 2880, 64, 8, 64, 2880, 32, 4, 2880, 201088,
                                           "MXFP4"))}


def _copy_tokenizer(w: GGUFWriter, src: Path) -> int:
    """Copy every tokenizer.* key of `src` into `w`; returns the vocabulary size."""
    r = GGUFReader(str(src))
    n_vocab = 0
    for name, field in r.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            w.add_key_value(name, value, vtype, sub_type=sub)
            if name == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        elif vtype == GGUFValueType.STRING:
            w.add_key_value(name, bytes(field.parts[-1]).decode("utf-8"), vtype)
        else:
            w.add_key_value(name, field.parts[-1].tolist()[0], vtype)
    return n_vocab


def _random_q4_0(n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """(n_rows, n_cols / 32 * 18) uint8: Q4_0 blocks with random nibbles and scales near 0.02/8."""
    nb = n_rows * n_cols // 32
    blocks = np.frombuffer(rng.bytes(nb * 18), dtype=np.uint8).reshape(nb, 18).copy()
    d = (rng.uniform(0.5, 1.5, nb) * 0.0025).astype(np.float16)
    blocks[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_rows, -1)


def _random_q6_k(n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    nb = n_rows * n_cols // 256
    blocks = np.frombuffer(rng.bytes(nb * 210), dtype=np.uint8).reshape(nb, 210).copy()
    blocks[:, 192:208] = rng.integers(-20, 20, (nb, 16), dtype=np.int8).view(np.uint8)
    d = (rng.uniform(0.5, 1.5, nb) * 0.0001).astype(np.float16)
    blocks[:, 208:210] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_rows, -1)


def _random_k(qtype: Q, n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """(n_rows, row_bytes) uint8 Q4_K / Q6_K blocks: random codes and small float16 scales."""
    size, fields = {Q.Q4_K: (144, (0, 2)), Q.Q6_K: (210, (208,))}[qtype]
    if qtype == Q.Q6_K:
        return _random_q6_k(n_rows, n_cols, rng)
    nb = n_rows * n_cols // 256
    blocks = np.frombuffer(rng.bytes(nb * size), dtype=np.uint8).reshape(nb, size).copy()
    for off in fields:
        blocks[:, off:off + 2] = (rng.uniform(0.5, 1.5, nb) * 0.0005).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_rows, -1)


def _random_q8_0(n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """(n_rows, n_cols / 32 * 34) uint8: Q8_0 blocks with random codes and scales near 0.02/127."""
    nb = n_rows * n_cols // 32
    blocks = np.frombuffer(rng.bytes(nb * 34), dtype=np.uint8).reshape(nb, 34).copy()
    blocks[:, 0:2] = (rng.uniform(0.5, 1.5, nb) * 0.00016).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_rows, -1)


def _random_mxfp4(n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """(n_rows, n_cols / 32 * 17) uint8: MXFP4 blocks with random codes and exponents 2^-10..2^-8."""
    nb = n_rows * n_cols // 32
    blocks = np.frombuffer(rng.bytes(nb * 17), dtype=np.uint8).reshape(nb, 17).copy()
    blocks[:, 0] = rng.integers(118, 121, nb, dtype=np.uint8)
    return blocks.reshape(n_rows, -1)


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the layers Q4_K_M gives Q6_K attn_v and ffn_down."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _moe_writer(path: Path, s: MoeShape, n_layers: int, context: int, rope_base: float, eps: float, ftype: int,
                rope_extras=None) -> GGUFWriter:
    """A writer with a mixture-of-experts shape's metadata, in the key order llama.cpp's converters use;
    rope_extras(w) adds the arch's own rope and attention keys after the rope base."""
    w = GGUFWriter(str(path), s.arch)
    w.add_name(f"{s.name}-random")
    w.add_block_count(n_layers)
    w.add_context_length(context)
    w.add_embedding_length(s.n_embd)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_freq_base(rope_base)
    if rope_extras is not None:
        rope_extras(w)
    w.add_layer_norm_rms_eps(eps)
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_expert_used)
    w.add_expert_feed_forward_length(s.n_ff_exp)
    w.add_file_type(ftype)
    return w


def write_gpt_oss(path: Path, tokenizer_src: Path | None, s: MoeShape, n_layers: int, seed: int = 0) -> Path:
    """gpt-oss's layout (llama.cpp's openai-moe): MXFP4 experts, Q8_0 for every other matrix, F32 biases,
    sinks and norms, random blocks; n_layers of them."""
    rng = np.random.default_rng(seed)

    def rope_extras(w: GGUFWriter) -> None:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(32.0)
        w.add_rope_scaling_orig_ctx_len(4096)
        w.add_sliding_window(128)
    w = _moe_writer(path, s, n_layers, 131072, 150000.0, 1e-5, 38, rope_extras)   # LLAMA_FTYPE_MOSTLY_MXFP4_MOE
    n_vocab = _copy_tokenizer(w, tokenizer_src) if tokenizer_src is not None else s.n_vocab

    def tensor(name: str, n_rows: int, n_cols: int, qtype: Q = Q.Q8_0, n_mats: int = 0) -> None:
        make = _random_mxfp4 if qtype == Q.MXFP4 else _random_q8_0
        data = make(max(n_mats, 1) * n_rows, n_cols, rng)
        if n_mats:
            data = data.reshape(n_mats, n_rows, -1)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    def vector(name: str, *shape: int, mean: float = 0.0) -> None:
        w.add_tensor(name, (mean + 0.1 * rng.standard_normal(shape[::-1])).astype(np.float32))

    q_dim, kv_dim = s.n_heads * s.head_dim, s.n_kv * s.head_dim
    tensor("token_embd.weight", n_vocab, s.n_embd)
    tensor("output.weight", n_vocab, s.n_embd)
    vector("output_norm.weight", s.n_embd, mean=1.0)
    for i in range(n_layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", s.n_embd, mean=1.0)
        for name, rows in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
            tensor(p + name + ".weight", rows, s.n_embd)
            vector(p + name + ".bias", rows)
        tensor(p + "attn_output.weight", s.n_embd, q_dim)
        vector(p + "attn_output.bias", s.n_embd)
        vector(p + "attn_sinks.weight", s.n_heads)
        vector(p + "post_attention_norm.weight", s.n_embd, mean=1.0)
        w.add_tensor(p + "ffn_gate_inp.weight",
                     (rng.standard_normal((s.n_expert, s.n_embd)) / s.n_embd ** 0.5).astype(np.float32))
        vector(p + "ffn_gate_inp.bias", s.n_expert)
        tensor(p + "ffn_gate_exps.weight", s.n_ff_exp, s.n_embd, Q.MXFP4, n_mats=s.n_expert)
        tensor(p + "ffn_up_exps.weight", s.n_ff_exp, s.n_embd, Q.MXFP4, n_mats=s.n_expert)
        tensor(p + "ffn_down_exps.weight", s.n_embd, s.n_ff_exp, Q.MXFP4, n_mats=s.n_expert)
        vector(p + "ffn_gate_exps.bias", s.n_ff_exp, s.n_expert)
        vector(p + "ffn_up_exps.bias", s.n_ff_exp, s.n_expert)
        vector(p + "ffn_down_exps.bias", s.n_embd, s.n_expert)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path


def write_moe(path: Path, tokenizer_src: Path | None, shape: MoeShape, n_layers: int, seed: int = 0) -> Path:
    """A mixture-of-experts file with the real per-layer shapes and Q4_K_M's type choices (Q4_K, with
    Q6_K for the output and, on llama.cpp's use_more_bits layers, attn_v and ffn_down_exps; the router
    F32), random blocks; n_layers of them."""
    rng = np.random.default_rng(seed)
    s = shape
    w = _moe_writer(path, s, n_layers, 4096, 1e6, 1e-6, 15)     # LLAMA_FTYPE_MOSTLY_Q4_K_M
    n_vocab = _copy_tokenizer(w, tokenizer_src) if tokenizer_src is not None else s.n_vocab

    def tensor(name: str, n_rows: int, n_cols: int, qtype: Q = Q.Q4_K, n_mats: int = 0) -> None:
        data = _random_k(qtype, max(n_mats, 1) * n_rows, n_cols, rng)
        if n_mats:
            data = data.reshape(n_mats, n_rows, -1)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    def vector(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    q_dim, kv_dim = s.n_heads * s.head_dim, s.n_kv * s.head_dim
    tensor("token_embd.weight", n_vocab, s.n_embd)
    tensor("output.weight", n_vocab, s.n_embd, Q.Q6_K)
    vector("output_norm.weight", s.n_embd)
    for i in range(n_layers):
        p, more = f"blk.{i}.", _more_bits(i, n_layers)
        vector(p + "attn_norm.weight", s.n_embd)
        tensor(p + "attn_q.weight", q_dim, s.n_embd)
        tensor(p + "attn_k.weight", kv_dim, s.n_embd)
        tensor(p + "attn_v.weight", kv_dim, s.n_embd, Q.Q6_K if more else Q.Q4_K)
        vector(p + "attn_q_norm.weight", s.head_dim)
        vector(p + "attn_k_norm.weight", s.head_dim)
        tensor(p + "attn_output.weight", s.n_embd, q_dim)
        vector(p + "ffn_norm.weight", s.n_embd)
        w.add_tensor(p + "ffn_gate_inp.weight",
                     (rng.standard_normal((s.n_expert, s.n_embd)) / s.n_embd ** 0.5).astype(np.float32))
        tensor(p + "ffn_gate_exps.weight", s.n_ff_exp, s.n_embd, n_mats=s.n_expert)
        tensor(p + "ffn_up_exps.weight", s.n_ff_exp, s.n_embd, n_mats=s.n_expert)
        tensor(p + "ffn_down_exps.weight", s.n_embd, s.n_ff_exp, Q.Q6_K if more else Q.Q4_K, n_mats=s.n_expert)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path


def write(path: Path, tokenizer_src: Path | None, dense_f16: bool, seed: int = 0,
          shape: Shape = SHAPES["tinyllama-1.1b"], context: int = 2048) -> Path:
    """The file: Q4_0 weights (Q6_K output), or with dense_f16 every weight F16 (quantizer input);
    tokenizer_src None: no tokenizer, the shape's vocabulary size; context: its training context."""
    rng = np.random.default_rng(seed)
    N_LAYERS, N_EMBD, N_HEADS, N_KV, N_FF = shape.n_layers, shape.n_embd, shape.n_heads, shape.n_kv, shape.n_ff
    w = GGUFWriter(str(path), "llama")
    w.add_name(f"{shape.name}-random")
    w.add_block_count(N_LAYERS)
    w.add_context_length(context)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1 if dense_f16 else 2)        # LLAMA_FTYPE_MOSTLY_F16 / MOSTLY_Q4_0
    n_vocab = _copy_tokenizer(w, tokenizer_src) if tokenizer_src is not None else shape.n_vocab

    def tensor(name: str, n_rows: int, n_cols: int, qtype: Q = Q.Q4_0) -> None:
        if dense_f16:
            data = (rng.standard_normal((n_rows, n_cols), dtype=np.float32) * 0.02).astype(np.float16)
            w.add_tensor(name, data)
            return
        data = _random_q4_0(n_rows, n_cols, rng) if qtype == Q.Q4_0 else _random_q6_k(n_rows, n_cols, rng)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    def vector(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    hd = N_EMBD // N_HEADS
    tensor("token_embd.weight", n_vocab, N_EMBD)
    tensor("output.weight", n_vocab, N_EMBD, Q.Q6_K)
    vector("output_norm.weight", N_EMBD)
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", N_EMBD)
        tensor(p + "attn_q.weight", N_HEADS * hd, N_EMBD)
        tensor(p + "attn_k.weight", N_KV * hd, N_EMBD)
        tensor(p + "attn_v.weight", N_KV * hd, N_EMBD)
        tensor(p + "attn_output.weight", N_EMBD, N_HEADS * hd)
        vector(p + "ffn_norm.weight", N_EMBD)
        tensor(p + "ffn_gate.weight", N_FF, N_EMBD)
        tensor(p + "ffn_up.weight", N_FF, N_EMBD)
        tensor(p + "ffn_down.weight", N_EMBD, N_FF)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path


QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(rc)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder (default: the tensorsplit model cache)")
    ap.add_argument("--llama-py", default=os.environ.get("LLAMA_PY"),
                    help="a Python with llama-cpp-python, for the Q4_K_M file (default: $LLAMA_PY)")
    ap.add_argument("--llama-quantize", default=os.environ.get("LLAMA_QUANTIZE"),
                    help="llama.cpp's llama-quantize, for the Q4_K_M file instead of --llama-py "
                         "(default: $LLAMA_QUANTIZE)")
    ap.add_argument("--shape", choices=sorted(SHAPES) + sorted(MOE_SHAPES), default="tinyllama-1.1b")
    ap.add_argument("--layers", type=int, default=None,
                    help="mixture-of-experts shapes: write this many layers of the real shape (default 6)")
    ap.add_argument("--context", type=int, default=2048,
                    help="dense shapes: the training context written in the file (default 2048; another "
                         "gives the Q4_0 file a -ctx<N/1024>k suffix), for decode at depth (bench -d)")
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="write no tokenizer (and fetch no SmolLM2 file); bench needs none")
    a = ap.parse_args()
    out = a.out or models.cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    tok = None if a.no_tokenizer else models.fetch("smollm2")
    if a.shape in MOE_SHAPES:
        n_layers = a.layers or 6
        shape = MOE_SHAPES[a.shape]
        path = out / f"{a.shape}-{n_layers}l-random.{shape.quant}.gguf"
        if not path.exists():
            print(f"writing {path}", file=sys.stderr)
            writer = write_gpt_oss if shape.arch == "gpt-oss" else write_moe
            writer(path.with_suffix(".partial"), tok, shape, n_layers)
            os.replace(path.with_suffix(".partial"), path)
        print(path)
        return 0
    shape = SHAPES[a.shape]
    suffix = "" if a.context == 2048 else f"-ctx{a.context // 1024}k"
    q4_0 = out / f"{shape.name}{suffix}-random.Q4_0.gguf"
    if not q4_0.exists():
        print(f"writing {q4_0}", file=sys.stderr)
        write(q4_0.with_suffix(".partial"), tok, dense_f16=False, shape=shape, context=a.context)
        os.replace(q4_0.with_suffix(".partial"), q4_0)
    print(q4_0)
    if suffix:
        return 0
    if (a.llama_py or a.llama_quantize) and shape.name == "tinyllama-1.1b" and tok is not None:
        q4_k_m = out / "tinyllama-1.1b-random.Q4_K_M.gguf"
        if not q4_k_m.exists():
            f16 = out / "tinyllama-1.1b-random.F16.gguf.tmp"
            print(f"writing {f16} and quantizing it to {q4_k_m} with llama.cpp", file=sys.stderr)
            write(f16, tok, dense_f16=True, shape=shape)
            try:
                cmd = ([a.llama_quantize, str(f16), str(q4_k_m), "Q4_K_M"] if a.llama_quantize else
                       [a.llama_py, "-c", QUANTIZE, str(f16), str(q4_k_m)])
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            finally:
                f16.unlink(missing_ok=True)
    else:
        print("no --llama-py or --llama-quantize: the Q4_K_M file is not written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

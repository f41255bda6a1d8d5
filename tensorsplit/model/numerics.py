"""Which arithmetic the forward pass uses: exact float32 (default) or llama.cpp's roundings.

llama.cpp's CPU backend rounds intermediate values in several places, and on Gemma 3, whose
residual stream reaches ~1e4, those roundings move perplexity by about half a percent.
Exact float32 is closer to the model; "llamacpp" reproduces llama.cpp's numbers for users
checking one against the other (and for our golden tests). In "llamacpp" mode:
  - each quantized matmul's input is rounded to 8-bit blocks, F16/BF16 weights' input to
    f16/bf16 (quants/activations.py);
  - the KV cache is float16, and attention rounds q and the softmax probabilities to f16
    before their matmuls with the f16 keys and values (llama.cpp without flash attention);
  - GELU is read from a table indexed by the f16 value of its input, output in f16.
One setting per process, like the threads: every rank of a world must use the same one
(it is part of the identity the ranks agree on).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NUMERICS = ("exact", "llamacpp")
_mode = "exact"


def set_numerics(mode: str) -> None:
    global _mode
    if mode not in NUMERICS:
        raise ValueError(f"numerics {mode!r}: expected one of {', '.join(NUMERICS)}")
    _mode = mode


def llamacpp() -> bool:
    return _mode == "llamacpp"


def round_f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    if not llamacpp():
        return F.gelu(x, approximate="tanh")
    # ggml_vec_gelu_f32 with GGML_GELU_FP16: table[f16(x)] as f16 for -10 < x < 10, else 0 or x
    y = round_f16(F.gelu(round_f16(x), approximate="tanh"))
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))

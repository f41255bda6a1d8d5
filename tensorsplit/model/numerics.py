"""Which arithmetic a model's forward pass uses: llama.cpp's roundings (the default) or exact float32.

`Numerics` is handed to the model when it is built (like `reduce`), and from there to its layers,
attention and rope; nothing reads a process-wide switch.

llamacpp (default): the arithmetic of llama.cpp's CPU backend, which is also the fast one here:
  - each quantized matmul's input row is quantized once to 8 bits (Q8_0 / Q8_1 / Q8_K blocks, as
    the weight type asks) and multiplied with the weight's codes in integers (the native kernels,
    tensorsplit/kernels); F16 / BF16 weights get their input rounded to f16 / bf16;
  - the KV cache is float16, and attention rounds q and the softmax probabilities to f16 before
    their matmuls with the f16 keys and values (llama.cpp without flash attention);
  - GELU is read from a table indexed by the f16 value of its input, output in f16;
  - rope angles are formed in float32 as ggml_rope_cache_init forms them.
exact: float32 activations everywhere (weights decoded to float in registers), a float32 KV cache
  and float64 rope angles: closer to the model than llama.cpp is (on Gemma 3, whose residual stream
  reaches ~1e4, llama.cpp's roundings move perplexity by about half a percent), and slower.
Every rank of a world must use the same one (it is part of the identity the ranks agree on).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUMERICS = ("llamacpp", "exact")
DEFAULT = "llamacpp"


def round_f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().to(x.dtype)


@dataclass(frozen=True)
class Numerics:
    mode: str = DEFAULT

    def __post_init__(self):
        if self.mode not in NUMERICS:
            raise ValueError(f"numerics {self.mode!r}: expected one of {', '.join(NUMERICS)}")

    @property
    def llamacpp(self) -> bool:
        return self.mode == "llamacpp"

    @property
    def kv_dtype(self) -> torch.dtype:
        """llama.cpp's KV cache is f16; ours is exact unless asked to match it."""
        return torch.float16 if self.llamacpp else torch.float32

    def gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        if not self.llamacpp:
            return F.gelu(x, approximate="tanh")
        # ggml_vec_gelu_f32 with GGML_GELU_FP16: table[f16(x)] as f16 for -10 < x < 10, else 0 or x
        y = round_f16(F.gelu(round_f16(x), approximate="tanh"))
        return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))

    def activation(self, name: str):
        """The FFN activation `name` ("silu" or "gelu_tanh") as this arithmetic computes it."""
        return {"silu": F.silu, "gelu_tanh": self.gelu_tanh}[name]


EXACT = Numerics("exact")
LLAMACPP = Numerics("llamacpp")

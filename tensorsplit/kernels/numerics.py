"""Which arithmetic a model's forward pass uses: llama.cpp's roundings (the default) or exact float32.

`Numerics` names one; the rank's kernels (base.py) are built for it, and each implementation settles
what it changes in its constructor. The model never reads it; nothing reads a process-wide switch.

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

NUMERICS = ("llamacpp", "exact")
DEFAULT = "llamacpp"


@dataclass(frozen=True)
class Numerics:
    mode: str = DEFAULT

    def __post_init__(self):
        if self.mode not in NUMERICS:
            raise ValueError(f"numerics {self.mode!r}: expected one of {', '.join(NUMERICS)}")

    @property
    def llamacpp(self) -> bool:
        """For the kernels' constructors (base.py): which of their two arithmetics to take."""
        return self.mode == "llamacpp"

    @property
    def kv_dtype(self) -> torch.dtype:
        """What the KV cache stores: llama.cpp's is f16; ours is exact unless asked to match it. The
        world plan reads it (its bytes per rank), and so do the kernels."""
        return torch.float16 if self.llamacpp else torch.float32

    def kv_types(self, k: str | None = None, v: str | None = None) -> tuple[str, str]:
        """The KV cache's types (kernels/kv_types.py) for -ctk / -ctv as given, each None taking this
        numerics' default (f16 or f32)."""
        default = "f16" if self.llamacpp else "f32"
        return (k or default, v or default)


EXACT = Numerics("exact")
LLAMACPP = Numerics("llamacpp")

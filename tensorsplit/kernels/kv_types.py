"""What a KV cache stores per value (-ctk/--cache-type-k, -ctv/--cache-type-v), as llama.cpp stores it.

    f32    float32
    f16    float16, rounded to nearest even (the default under llama.cpp numerics, as llama.cpp's)
    bf16   bfloat16, rounded to nearest even (ggml's fp32 -> bf16)
    q8_0   blocks of 32: an f16 scale d = amax / 127, then 32 int8 codes round(x * 127 / amax), ties to
           even (ggml-cpu's x86 quantize_row_q8_0); 34 bytes, read as d * q
    q4_0   blocks of 32: an f16 scale d = m / -8 (m: the value of largest magnitude, the first of equals),
           then 16 bytes of 4-bit codes min(15, trunc(x / d + 8.5)), value j in the low nibble of byte
           j and value j + 16 in the high one (quantize_row_q4_0_ref); 18 bytes, read as (q - 8) d

A cache of a float type is a tensor of that dtype, (..., head_dim); of a block type, uint8 (...,
head_dim / 32 * block bytes): one head's row is whole blocks (head_dim must be a multiple of 32). The
type of a cache tensor follows from its dtype and row length (`type_of`): the kernels take caches as
tensors, and the native attention op (csrc/kv_cache.h) reads the same layout in place.

A quantized cache holds rotated vectors, as llama.cpp's does (llama-kv-cache.cpp attn_rot_k / attn_rot_v):
where the head dim is a multiple of 64, each head's q and k are multiplied, in chunks of `k_rotation`
values (the largest power of two >= 64 dividing the head dim), by the normalised Walsh-Hadamard matrix
(Sylvester's order, entries +-1/sqrt(n); orthonormal and its own inverse), and v in chunks of 64 by
that of 64, whose product with the probabilities is rotated back. q.k and the softmax are unchanged;
what changes is that an outlier is spread over the chunk before it is rounded to 4 or 8 bits. `rotate`
is the transform as a fast Walsh-Hadamard butterfly (csrc/kv_cache.h kv_rotate does the same steps).

`encode` and `decode` are the reference (torch, any device); the native op has its own C++ codec with
the same bits (tests/test_kv_types.py holds both to a NumPy transcription of llama.cpp's).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import TensorsplitError

QK = 32            # values per block of q8_0 / q4_0


@dataclass(frozen=True)
class KvType:
    name: str
    code: int                 # csrc/kv_cache.h KvType
    block: int                # values per block: 1 for a float type
    block_bytes: int          # bytes per block
    dtype: torch.dtype        # the storage tensor's dtype

    @property
    def quantized(self) -> bool:
        return self.block > 1

    def row_elems(self, head_dim: int) -> int:
        """Storage elements of one head's row of head_dim values."""
        return head_dim // self.block * self.block_bytes if self.quantized else head_dim

    def row_bytes(self, head_dim: int) -> int:
        return self.row_elems(head_dim) * self.dtype.itemsize

    def check(self, head_dim: int) -> None:
        if self.quantized and head_dim % self.block:
            raise TensorsplitError(f"cache type {self.name}: the model's head dim {head_dim} is not a multiple of "
                                   f"{self.block}; use f16, bf16 or f32")


KV_TYPES = {t.name: t for t in (
    KvType("f32", 0, 1, 4, torch.float32),
    KvType("f16", 1, 1, 2, torch.float16),
    KvType("bf16", 2, 1, 2, torch.bfloat16),
    KvType("q8_0", 3, QK, 34, torch.uint8),
    KvType("q4_0", 4, QK, 18, torch.uint8),
)}
_BY_DTYPE = {t.dtype: t for t in KV_TYPES.values() if not t.quantized}


def kv_type(name) -> KvType:
    """A KvType from its name (f16, q8_0, ...), a float dtype, or itself."""
    if isinstance(name, KvType):
        return name
    if isinstance(name, torch.dtype):
        if name not in _BY_DTYPE:
            raise TensorsplitError(f"no KV cache type stores {name}")
        return _BY_DTYPE[name]
    if name not in KV_TYPES:
        raise TensorsplitError(f"cache type {name!r}: expected one of {', '.join(KV_TYPES)}")
    return KV_TYPES[name]


def type_of(store: torch.Tensor, head_dim: int) -> KvType:
    """The KvType of a cache tensor whose rows hold head_dim values each."""
    if store.dtype != torch.uint8:
        return kv_type(store.dtype)
    for t in KV_TYPES.values():
        if t.quantized and store.shape[-1] == t.row_elems(head_dim):
            return t
    raise AssertionError(f"a uint8 cache row of {store.shape[-1]} bytes holds no {head_dim} values")


def k_rotation(t: KvType, head_dim: int) -> int:
    """The Walsh-Hadamard chunk that q and k are rotated by in a cache of keys of type t (0: none)."""
    if not t.quantized or head_dim % 64:
        return 0
    n = 64
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


def v_rotation(t: KvType, head_dim: int) -> int:
    """The chunk that v (and the attention's output, back) is rotated by in a cache of values of type t."""
    return 64 if t.quantized and head_dim % 64 == 0 else 0


def rotate(x: torch.Tensor, n: int) -> torch.Tensor:
    """x (..., head_dim) float32, each chunk of n values times the normalised Walsh-Hadamard matrix of n:
    butterflies (a + b, a - b) over pairs h apart for h = 1, 2, .., n / 2, then times 1/sqrt(n) in float32
    (the bits of csrc/kv_cache.h kv_rotate). n = 0: x itself."""
    if not n:
        return x
    shape = x.shape
    y = x.reshape(-1, shape[-1] // n, n)
    h = 1
    while h < n:
        y = y.reshape(y.shape[0], y.shape[1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    scale = float(np.float32(1) / np.sqrt(np.float32(n)))
    return (y.reshape(shape) * scale).to(x.dtype)


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """(..., 1) float32 -> (..., 2) uint8: the f16's bytes, little-endian as ggml stores them."""
    return d.to(torch.float16).view(torch.uint8)


def encode(x: torch.Tensor, t: KvType) -> torch.Tensor:
    """x (..., head_dim) float -> the cache's storage of it, (..., t.row_elems(head_dim))."""
    if not t.quantized:
        return x.to(t.dtype)
    lead, hd = x.shape[:-1], x.shape[-1]
    b = x.float().reshape(-1, QK)                                   # (blocks, 32)
    if t.name == "q8_0":
        amax = b.abs().amax(-1, keepdim=True)
        inv = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
        q = torch.round(b * inv).to(torch.int8).view(torch.uint8)   # round: ties to even
        out = torch.cat([_f16_bytes(amax / 127.0), q], -1)
    else:                                                           # q4_0
        m = b.gather(-1, b.abs().argmax(-1, keepdim=True))          # first of the largest magnitudes
        d = m / -8.0
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = torch.clamp((b * inv + 8.5).trunc(), max=15).to(torch.uint8)
        out = torch.cat([_f16_bytes(d), q[:, :16] | (q[:, 16:] << 4)], -1)
    return out.reshape(*lead, hd // QK * t.block_bytes)


def decode(s: torch.Tensor, t: KvType, head_dim: int, dtype=torch.float32) -> torch.Tensor:
    """The cache's storage (..., t.row_elems(head_dim)) -> values (..., head_dim) of `dtype`."""
    if not t.quantized:
        return s.to(dtype)
    lead = s.shape[:-1]
    b = s.reshape(-1, t.block_bytes)
    d = b[:, :2].contiguous().view(torch.float16).float()          # (blocks, 1)
    if t.name == "q8_0":
        q = b[:, 2:].contiguous().view(torch.int8).float()
    else:
        codes = b[:, 2:]
        q = torch.cat([codes & 15, codes >> 4], -1).float() - 8.0
    return (q * d).reshape(*lead, head_dim).to(dtype)


def round_trip(x: torch.Tensor, t: KvType) -> torch.Tensor:
    """x as the cache gives it back: what a step's own keys are worth when it reads them."""
    return decode(encode(x, t), t, x.shape[-1], x.dtype)

"""y = x @ W.T on a GPU for a weight in GGUF blocks, in Triton, so that one source serves CUDA and
ROCm. `launch_config` picks the kernel by the number of x rows M and the format:

  gemv (M <= GEMV_MAX_ROWS, decode steps): a program owns BLOCK_N weight rows and one range of K and
      reads each block once for all M rows, multiplying in float32. gemv.py's kernel loads 16-bit
      words (MXFP4: bytes) for every format but Q2_K / Q3_K; those two take _gemv_kernel here, one
      element per lane (decode.py). When the rows alone make too few programs to keep every
      multiprocessor reading (a 2048-row weight is 16 programs of 128 rows), K is split in ranges,
      and torch adds the ranges' partial sums (one small op).
  gemm (more rows, prompt chunks): (BLOCK_M, BLOCK_N) output tiles; each K step decodes a (BLOCK_N, 32)
      weight tile in registers (tiles.py from word loads, decode.py for Q2_K / Q3_K) and feeds tl.dot
      with float32 accumulation: operands in fp16 for numerics "llamacpp" (as llama.cpp's GPU backends
      multiply prompts), in float32 (ieee) for "exact". MXFP4's tile is its codes' values, and each
      row's power-of-two block scale multiplies the step's dot (a K step is one MXFP4 block): fp16
      holds the values exactly, but not weights from 2^-128 to 12 * 2^127.

No dequantized copy of a weight is ever written, not even a tile. The block sizes are chosen from the
compiled code's registers and instruction counts (offline.py), not yet tuned on a GPU
(scripts/gpu_check.sh measures them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import FORMATS
from ..layout import IQ4_LEVELS
from ..quants.formats_mx import E2M1_DOUBLED
from .decode import decode
from .gemv import UNITS, gemv_words_kernel
from .tiles import WORD_TILE_FORMATS, mx_tile, word_tile

GEMV_MAX_ROWS = 16
# programs the gemv aims for per multiprocessor before it splits K (enough loads in flight to stream)
PROGRAMS_PER_SM = 4
GEMM_BLOCKS = (64, 64, 32)   # BLOCK_M, BLOCK_N, KC of the gemm; BLOCK_M 128 from GEMM_TALL rows on
GEMM_TALL = 128              # (each decoded weight tile then serves twice the rows: the decode, not the
                             # tensor cores, is most of a gemm step's instructions, offline.py)
# the float32 gemm (--numerics exact) multiplies with FMAs, not tensor cores, and holds its operands as
# float32: at 64 x 64 the IQ4 formats spilled 24-32 bytes on sm_90 (592 at 128 rows), at 32 x 64 none
GEMM_BLOCKS_F32 = (32, 64, 32)
GEMM_WARPS = 8               # 4 spilled the K-quant decode on sm_90 (offline.py)
GEMV_WARPS = 4

_tables: dict = {}        # (device, MXFP4 or not) -> the 16 values of a 4-bit code, a float32 tensor
_sm_count: dict = {}


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, row_bytes, k_per_split,
                 FMT: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr):
    """y[split] (M, N) = x[:, K range of this split] @ W[rows, K range].T; x (M, K) float32. K and
    k_per_split are multiples of KC (every block size is a multiple of 32 = KC)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, KC)
    row_ok = rows < N
    row_base = w_ptr + rows.to(tl.int64)[:, None] * row_bytes          # (BLOCK_N, 1)
    k0 = split * k_per_split
    k1 = tl.minimum(k0 + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N, KC), dtype=tl.float32)          # summed over KC once, at the end
    for c in range(k0, k1, KC):
        cols = c + kk[None, :]                                          # (1, KC)
        w = decode(row_base, cols, row_ok[:, None], FMT, QK, TS)                         # (BLOCK_N, KC)
        x = tl.load(x_ptr + ms[:, None] * K + cols, mask=ms[:, None] < M, other=0.0)    # (BLOCK_M, KC)
        acc += x[:, None, :] * w[None, :, :]
    out = y_ptr + split.to(tl.int64) * M * N + ms[:, None] * N + rows[None, :]
    tl.store(out, tl.sum(acc, axis=2), mask=(ms[:, None] < M) & row_ok[None, :])


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, tab_ptr, y_ptr, M, N, K, row_bytes,
                 FMT: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr, FP16: tl.constexpr, WORDS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr):
    """y (M, N) = x (M, K) @ W.T, one (BLOCK_M, BLOCK_N) tile per program. WORDS: the weight tiles come
    from word loads in the words' column order (tiles.py; x is loaded in the same order), else from
    decode.py element by element (KC = 32 either way; K is a multiple of 32)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, KC)
    m_ok, row_ok = ms < M, rows < N
    row_base = w_ptr + rows.to(tl.int64)[:, None] * row_bytes
    x_rows = x_ptr + ms.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, K, KC):
        if FMT == 39:     # MXFP4: the dot on the codes' values, then each row's 2^(e - 128) (exact)
            v, perm, s = mx_tile(row_base, c, row_ok[:, None], tab_ptr)                  # (BLOCK_N, 32)
            x = tl.load(x_rows + c + perm, mask=m_ok[:, None], other=0.0)               # (BLOCK_M, 32)
            if FP16:
                dot = tl.dot(x.to(tl.float16), tl.trans(v.to(tl.float16)))
            else:
                dot = tl.dot(x, tl.trans(v), input_precision="ieee")
            acc += dot * tl.reshape(s, (1, BLOCK_N))
        else:
            if WORDS:
                w, perm = word_tile(row_base, c, row_ok[:, None], tab_ptr, FMT, QK, TS)   # (BLOCK_N, 32)
                x = tl.load(x_rows + c + perm, mask=m_ok[:, None], other=0.0)           # (BLOCK_M, 32)
            else:
                cols = c + kk[None, :]
                w = decode(row_base, cols, row_ok[:, None], FMT, QK, TS)                # (BLOCK_N, KC)
                x = tl.load(x_rows + cols, mask=m_ok[:, None], other=0.0)               # (BLOCK_M, KC)
            if FP16:
                acc += tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)))
            else:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    tl.store(y_ptr + ms.to(tl.int64)[:, None] * N + rows[None, :], acc, mask=m_ok[:, None] & row_ok[None, :])


def _table_on(type_id: int, device: torch.device) -> torch.Tensor:
    """tab_ptr of the kernels: MXFP4's doubled E2M1 values (quants/formats_mx.py), else the IQ4 levels
    (layout.IQ4_LEVELS; formats without a table never read it)."""
    key = (device, type_id == 39)
    t = _tables.get(key)
    if t is None:
        t = _tables[key] = torch.tensor(E2M1_DOUBLED if type_id == 39 else IQ4_LEVELS, dtype=torch.float32,
                                        device=device)
    return t


def _multiprocessors(device: torch.device) -> int:
    n = _sm_count.get(device)
    if n is None:
        n = _sm_count[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                                 if device.type == "cuda" else 1)
    return n


def gemv_blocks(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, KC) of the per-element gemv for m x rows: a (32, 32) weight tile per step, 16
    rows from 8 x rows on (the decode of an element takes ~20 registers' worth of temporaries: larger
    tiles spilled on sm_90, see offline.py)."""
    block_m = triton.next_power_of_2(m)
    return block_m, 32 if block_m <= 4 else 16, 32


def words_blocks(type_id: int, m: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of gemv.py's kernel for m x rows: weight rows per program such that the kernel
    stays within 128 registers on sm_90 (offline.py reads the compiled register counts)."""
    block_m = triton.next_power_of_2(m)
    rows_at_1 = {12: 32, 13: 32, 14: 64}.get(type_id, 128)    # the K-quants hold more per row
    return block_m, max(16, rows_at_1 // block_m)


def k_splits(n_rows: int, n_steps: int, block_n: int, multiprocessors: int) -> int:
    """How many K ranges a gemv splits into: enough programs for PROGRAMS_PER_SM per multiprocessor,
    each range at least 8 K steps long (shorter ranges cost more in partial sums than they gain)."""
    programs = triton.cdiv(n_rows, block_n)
    want = triton.cdiv(PROGRAMS_PER_SM * multiprocessors, programs)
    return max(1, min(want, n_steps // 8))


def launch_config(type_id: int, m: int, fp16_gemm: bool) -> tuple[str, object, dict]:
    """(kernel name, kernel, compile-time constants) qmatmul launches for m rows of x against type_id,
    with GEMM_WARPS or GEMV_WARPS warps; offline.py compiles the same choices for GPUs not here."""
    f = FORMATS[type_id]
    if m <= GEMV_MAX_ROWS and type_id in UNITS:       # gemv.py: 16-bit word loads
        unit, words = UNITS[type_id]
        block_m, block_n = words_blocks(type_id, m)
        return "gemv_words", gemv_words_kernel, dict(FMT=type_id, TS=f.block_bytes, UNIT=unit,
                                                     PER_BLOCK=f.block // unit, W=words, BLOCK_M=block_m,
                                                     BLOCK_N=block_n)
    if m <= GEMV_MAX_ROWS:                             # Q2_K, Q3_K: one element per lane (decode.py)
        assert type_id in (10, 11), type_id
        block_m, block_n, kc = gemv_blocks(m)
        return "gemv", _gemv_kernel, dict(FMT=type_id, QK=f.block, TS=f.block_bytes, BLOCK_M=block_m,
                                          BLOCK_N=block_n, KC=kc)
    if fp16_gemm:
        block_m, block_n, kc = GEMM_BLOCKS
        block_m = 2 * block_m if m >= GEMM_TALL else block_m
    else:
        block_m, block_n, kc = GEMM_BLOCKS_F32
    assert type_id in WORD_TILE_FORMATS or type_id in (10, 11, 39), type_id
    return "gemm", _gemm_kernel, dict(FMT=type_id, QK=f.block, TS=f.block_bytes, FP16=fp16_gemm,
                                      WORDS=type_id in WORD_TILE_FORMATS, BLOCK_M=block_m, BLOCK_N=block_n, KC=kc)


def qmatmul(x2: torch.Tensor, data: torch.Tensor, type_id: int, n_rows: int, n_cols: int, fp16_gemm: bool,
            splits: int | None = None) -> torch.Tensor:
    """x2 (M, n_cols) float32 @ W.T -> (M, n_rows) float32. data: (n_rows, row bytes) uint8 GGUF blocks of
    type_id on x2's device. fp16_gemm: prompt-sized M multiplies in fp16 (else ieee float32).
    splits: the gemv's K ranges (default: k_splits); tests force it."""
    f = FORMATS[type_id]
    assert x2.dtype == torch.float32 and x2.is_contiguous() and x2.shape[1] == n_cols, (x2.dtype, x2.shape)
    assert data.dtype == torch.uint8 and data.is_contiguous() and data.shape[0] == n_rows, (data.dtype, data.shape)
    assert n_cols % f.block == 0 and data.shape[1] == n_cols // f.block * f.block_bytes, (n_cols, data.shape)
    m = x2.shape[0]
    name, kernel, const = launch_config(type_id, m, fp16_gemm)
    if name == "gemm":
        y = torch.empty((m, n_rows), dtype=torch.float32, device=x2.device)
        grid = (triton.cdiv(m, const["BLOCK_M"]), triton.cdiv(n_rows, const["BLOCK_N"]))
        kernel[grid](x2, data, _table_on(type_id, x2.device), y, m, n_rows, n_cols, data.shape[1], **const,
                     num_warps=GEMM_WARPS)
        return y
    # a gemv: K in ranges of whole steps (a unit of the word kernel, KC columns of the other; both
    # divide every block size)
    step = const["UNIT"] if name == "gemv_words" else const["KC"]
    n_steps = n_cols // step
    n_split = min(splits or k_splits(n_rows, n_steps, const["BLOCK_N"], _multiprocessors(x2.device)), n_steps)
    per_split = triton.cdiv(n_steps, n_split)
    n_split = triton.cdiv(n_steps, per_split)
    y = torch.empty((n_split, m, n_rows), dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(n_rows, const["BLOCK_N"]), n_split)
    if name == "gemv_words":
        kernel[grid](x2, data, _table_on(type_id, x2.device), y, m, n_rows, n_cols, data.shape[1], per_split, **const,
                     num_warps=GEMV_WARPS)
    else:
        kernel[grid](x2, data, y, m, n_rows, n_cols, data.shape[1], per_split * step, **const,
                     num_warps=GEMV_WARPS)
    return y[0] if n_split == 1 else y.sum(0)

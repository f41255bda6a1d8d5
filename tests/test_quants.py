"""tensorsplit.kernels.quants against gguf-py's reference dequantizers (never against itself).

Dequantization must be bit-exact: our torch code performs the same float32 operations in the
same order as gguf-py (fp16 -> fp32 conversions, one multiply / one multiply-add per element),
and every integer step is exact, so there is no rounding to tolerate.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES

from tensorsplit.errors import ShardPlanError, UnsupportedError
from tensorsplit.kernels.numerics import EXACT
from tensorsplit.kernels import torch_kernels as qmm
from tensorsplit.kernels.quants import SUPPORTED, QWeight, block_info, dequantize, row_bytes, slice_cols
from tensorsplit.kernels.torch_kernels import TorchKernels

ALL = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
       QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS, QT.MXFP4]
FLOATS = [QT.F32, QT.F16, QT.BF16]
# formats gguf-py can quantize (the others only have dequantize_blocks)
QUANTIZABLE = FLOATS + [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.MXFP4]
# byte offsets of the fp16 scale fields inside one block (from gguf-py's dequantize_blocks);
# random bytes there could be NaN/inf, so the tests overwrite them with finite values
F16_FIELDS = {
    QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
    QT.IQ4_NL: (0,), QT.IQ4_XS: (0,), QT.MXFP4: (),
}
# MXFP4's E8M0 scale byte: random exponents over all 256 would overflow float32 (2^127 * 6); keep them
# within 2^-40 .. 2^8 in the random blocks, 0 and 1 (subnormal scales) included
E8M0_FIELDS = {QT.MXFP4: 0}


def make_raw(qtype, n_rows: int, n_cols: int, how: str, seed: int = 0) -> np.ndarray:
    """uint8 (n_rows, row_bytes) GGUF rows: gguf-py-quantized random floats, or random bytes."""
    rng = np.random.default_rng(seed + int(qtype))
    if how == "quantize":
        data = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
        return np.ascontiguousarray(gq.quantize(data, qtype)).view(np.uint8).reshape(n_rows, -1)
    bs, ts = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_rows * n_cols // bs, ts), dtype=np.uint8)
    if qtype in E8M0_FIELDS:
        e = rng.integers(88, 136, len(blocks), dtype=np.uint8)
        e[:2] = (0, 1)
        blocks[:, E8M0_FIELDS[qtype]] = e
    for off in F16_FIELDS[qtype]:
        # finite fp16 scales over many magnitudes (subnormals included), both signs
        vals = rng.standard_normal(len(blocks)) * 10.0 ** rng.uniform(-7, 1, len(blocks))
        blocks[:, off:off + 2] = vals.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_rows, -1)


def n_cols_for(qtype, n_blocks: int = 2) -> int:
    return GGML_QUANT_SIZES[qtype][0] * n_blocks if qtype not in FLOATS else 40


def reference(raw: np.ndarray, qtype) -> torch.Tensor:
    """gguf-py's float32 dequantization, (n_rows, n_cols)."""
    return torch.from_numpy(np.array(gq.dequantize(raw, qtype), dtype=np.float32))


CASES = [(t, "quantize") for t in QUANTIZABLE] + [(t, "random") for t in ALL if t not in FLOATS]


# (elements per block, bytes per block), written out from ggml's block structs (ggml-common.h)
# rather than read from gguf-py's GGML_QUANT_SIZES, which is where block_info comes from
BLOCKS = {
    QT.F32: (1, 4), QT.F16: (1, 2), QT.BF16: (1, 2),
    QT.Q8_0: (32, 2 + 32),                    # d | qs[32]
    QT.Q4_0: (32, 2 + 16),                    # d | qs[16]
    QT.Q4_1: (32, 2 + 2 + 16),                # d | m | qs[16]
    QT.Q5_0: (32, 2 + 4 + 16),                # d | qh[4] | qs[16]
    QT.Q5_1: (32, 2 + 2 + 4 + 16),            # d | m | qh[4] | qs[16]
    QT.Q2_K: (256, 16 + 64 + 2 + 2),          # scales[16] | qs[64] | d | dmin
    QT.Q3_K: (256, 32 + 64 + 12 + 2),         # hmask[32] | qs[64] | scales[12] | d
    QT.Q4_K: (256, 2 + 2 + 12 + 128),         # d | dmin | scales[12] | qs[128]
    QT.Q5_K: (256, 2 + 2 + 12 + 32 + 128),    # d | dmin | scales[12] | qh[32] | qs[128]
    QT.Q6_K: (256, 128 + 64 + 16 + 2),        # ql[128] | qh[64] | scales[16] | d
    QT.IQ4_NL: (32, 2 + 16),                  # d | qs[16]
    QT.IQ4_XS: (256, 2 + 2 + 4 + 128),        # d | scales_h | scales_l[4] | qs[128]
    QT.MXFP4: (32, 1 + 16),                   # e | qs[16]
}


def test_supported_and_block_info():
    assert SUPPORTED == frozenset(ALL) == frozenset(BLOCKS)
    for t in ALL:
        assert block_info(t) == BLOCKS[t], t.name
        bs, ts = BLOCKS[t]
        assert row_bytes(t, bs * 3) == ts * 3


@pytest.mark.parametrize("qtype,how", CASES, ids=[f"{t.name}-{h}" for t, h in CASES])
def test_dequantize_bit_exact(qtype, how):
    n_cols = n_cols_for(qtype, 3)
    raw = make_raw(qtype, 5, n_cols, how)
    ref = reference(raw, qtype)
    assert torch.isfinite(ref).all()
    got = dequantize(torch.from_numpy(raw), qtype, n_cols)
    assert got.dtype == torch.float32 and got.shape == (5, n_cols)
    assert torch.equal(got, ref)
    # via QWeight.from_numpy on a non-contiguous, read-only view (as a memmap slice would be)
    big = np.zeros((10, raw.shape[1] + 6), dtype=np.uint8)
    big[::2, 3:-3] = raw
    view = big[::2, 3:-3]
    view.flags.writeable = False
    w = QWeight.from_numpy(view, qtype, 5, n_cols, name="t")
    assert w.qtype == qtype and w.nbytes == raw.nbytes
    assert torch.equal(dequantize(w.data, qtype, n_cols), ref)


@pytest.mark.parametrize("qtype", FLOATS, ids=lambda t: t.name)
def test_float_types_accept_typed_tensors(qtype):
    raw = make_raw(qtype, 4, 24, "quantize")
    ref = reference(raw, qtype)
    w = QWeight.from_numpy(raw, qtype, 4, 24)
    assert w.data.dtype == {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}[qtype]
    assert w.data.shape == (4, 24)
    assert torch.equal(dequantize(w.data, qtype, 24), ref)


def _check_matmul(x: torch.Tensor, w: QWeight, dense: torch.Tensor):
    """The reference kernels' matmul (weights in GGUF layout, exact numerics) vs a float64 product of
    gguf-py's dense weights. (The native kernels and llama.cpp's numerics: test_kernels.py.)

    Tolerance: the textbook float32 dot-product error bound, |err| <= K * u * sum_k |x_k w_k|
    with u = 2**-24 (doubled for slack). A single wrongly decoded weight would exceed it.
    """
    y = TorchKernels(EXACT).matmul(x, w)
    assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], w.n_rows)
    xd, wd = x.double(), dense.double()
    ref = xd @ wd.T
    bound = 2 * w.n_cols * 2.0 ** -24 * (xd.abs() @ wd.abs().T) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_qmatmul_tiled_and_batched(qtype, monkeypatch):
    n_rows, n_cols = 37, n_cols_for(qtype, 2)
    raw = make_raw(qtype, n_rows, n_cols, "quantize" if qtype in QUANTIZABLE else "random")
    dense = reference(raw, qtype)
    w = QWeight.from_numpy(raw, qtype, n_rows, n_cols, name="blk.0.ffn_up.weight")
    x = torch.randn(2, 3, n_cols, generator=torch.Generator().manual_seed(1))

    _check_matmul(x[0, 0], w, dense)                    # 1-D x, one tile
    tiles = []
    real = qmm.dequantize

    def spy(raw_rows, *a, **k):
        tiles.append(raw_rows.shape[0])
        return real(raw_rows, *a, **k)

    monkeypatch.setattr(qmm, "dequantize", spy)
    monkeypatch.setattr(qmm, "TILE_ELEMS", 5 * n_cols + 1)  # 5 rows per tile, last tile partial
    _check_matmul(x, w, dense)                          # 3-D x, many tiles
    if qtype != QT.F32:                                 # dense F32 needs no dequant tiles
        assert max(tiles) <= 5 and sum(tiles) == n_rows and len(tiles) == 8


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q8_0, QT.IQ4_XS, QT.BF16], ids=lambda t: t.name)
def test_get_rows(qtype):
    n_cols = n_cols_for(qtype, 2)
    raw = make_raw(qtype, 9, n_cols, "quantize" if qtype in QUANTIZABLE else "random")
    dense = reference(raw, qtype)
    w = QWeight.from_numpy(raw, qtype, 9, n_cols)
    ids = torch.tensor([4, 0, 8, 4])
    got = TorchKernels(EXACT).get_rows(w, ids)
    assert got.shape == (4, n_cols)
    assert torch.equal(got, dense[ids])


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q5_0, QT.IQ4_NL, QT.F16], ids=lambda t: t.name)
def test_slice_cols(qtype):
    bs = GGML_QUANT_SIZES[qtype][0]
    n_cols = n_cols_for(qtype, 4)
    raw = make_raw(qtype, 6, n_cols, "quantize" if qtype in QUANTIZABLE else "random")
    dense = reference(raw, qtype)
    w = QWeight.from_numpy(raw, qtype, 6, n_cols, name="blk.1.attn_output.weight")
    start, end = (bs, 3 * bs) if bs > 1 else (7, 29)
    part = slice_cols(w, start, end)
    assert part.n_cols == end - start and part.n_rows == 6
    assert torch.equal(dequantize(part.data, qtype, part.n_cols), dense[:, start:end])
    x = torch.randn(2, end - start, generator=torch.Generator().manual_seed(2))
    _check_matmul(x, part, dense[:, start:end])


@pytest.mark.parametrize("start,end,bad", [(16, 256, 16), (0, 300, 300)])
def test_slice_cols_off_block_raises(start, end, bad):
    raw = make_raw(QT.Q4_K, 2, 512, "random")
    w = QWeight.from_numpy(raw, QT.Q4_K, 2, 512, name="blk.3.ffn_down.weight")
    with pytest.raises(ShardPlanError) as e:
        slice_cols(w, start, end)
    msg = str(e.value)
    assert "blk.3.ffn_down.weight" in msg and "Q4_K" in msg and "256" in msg and str(bad) in msg


def test_unsupported_type_raises():
    name = "blk.0.attn_q.weight"
    bs, ts = GGML_QUANT_SIZES[QT.IQ2_XXS]
    raw = np.zeros((2, ts), dtype=np.uint8)
    for make in (lambda: QWeight.from_numpy(raw, QT.IQ2_XXS, 2, bs, name=name),
                 lambda: QWeight(torch.from_numpy(raw), QT.IQ2_XXS, 2, bs, name=name),
                 lambda: dequantize(torch.from_numpy(raw), QT.IQ2_XXS, bs, name=name)):
        with pytest.raises(UnsupportedError) as e:
            make()
        assert name in str(e.value) and "IQ2_XXS" in str(e.value) and "Q4_K" in str(e.value)

"""The GPU's quantized matmuls (tensorsplit/kernels/gpu: Triton, straight from GGUF blocks) against
the independent reference of tests/kernel_reference.py: gguf-py's numpy dequantization, a float64
product, and for llama.cpp's numerics its activation quantization transcribed in NumPy.

On a GPU the kernels run there; without one, under Triton's interpreter on CPU tensors (conftest.py
sets TRITON_INTERPRET=1), which runs the same kernel source: the decoding, masking, split-K and tile
logic, not the compiled code's speed.

Tolerances, in units of 2^-24 * sum(|w| |x|) per output (kernel_reference's scale):
- gemv (decode steps, up to 16 rows) and the float32 gemm (exact numerics): float32 products summed
  over the row, 8 + K as for the torch path (tests/test_kernels.py);
- the fp16 gemm (llamacpp numerics, prompt chunks): both operands rounded to fp16 (2^-11 relative
  each, so 2^-10 per product, that is 2^14 units), then float32 sums.
A wrong bit field, scale or block offset is off by orders of magnitude more.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

pytest.importorskip("triton", reason="no Triton wheel for this machine (scripts/setup.sh installs one where it can)")

from kernel_reference import EPS32, matmul_exact, matmul_llamacpp
from synthetic import random_quantized, write_model
from tensorsplit.kernels import gpu  # noqa: E402
from tensorsplit.kernels.gpu.gemv import UNITS
from tensorsplit.kernels.gpu.matmul import GEMV_MAX_ROWS, gemv_blocks, k_splits, qmatmul as raw_qmatmul, words_blocks
from tensorsplit.kernels.layout import FORMATS
from tensorsplit.kernels.choice import choose_kernels
from tensorsplit.kernels.counting import Counting
from tensorsplit.kernels.numerics import EXACT, LLAMACPP
from tensorsplit.kernels.quants import QWeight
from tensorsplit.kernels.torch_kernels import TorchKernels
from tensorsplit.kernels.triton_kernels import TritonKernels
from test_kernels import F16_FIELDS, QUANTS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROWS_M = (1, 2, 3, 7, 16, 17, 40, 130)     # gemv up to 16, gemm beyond (tiles of 128 rows from 128)
FP16_UNITS = 2 ** 14


def _bound_units(n_cols: int, m: int, fp16_gemm: bool) -> float:
    return 8 + n_cols + (FP16_UNITS if fp16_gemm and m > GEMV_MAX_ROWS else 0)


def _check(y: torch.Tensor, ref: np.ndarray, scale: np.ndarray, units: float, what: str) -> None:
    err = np.abs(y.detach().cpu().numpy().astype(np.float64) - ref)
    worst = float((err / (units * EPS32 * scale + 1e-30)).max())
    assert worst <= 1.0, f"{what}: error {err.max():.3g} is {worst:.2f} x the bound ({units:g} * 2^-24 * sum|w||x|)"


def _run(raw: np.ndarray, qtype, x: np.ndarray, fp16_gemm: bool, splits: int | None = None) -> torch.Tensor:
    data = torch.from_numpy(raw).to(DEVICE)
    return raw_qmatmul(torch.from_numpy(x).to(DEVICE), data, int(qtype), raw.shape[0], x.shape[1], fp16_gemm, splits)


def _reference(raw, qtype, x, numerics):
    if numerics is LLAMACPP:                 # the input as llama.cpp's CPU backend rounds it, then exact
        return matmul_llamacpp(raw, qtype, x, q8_1_sum_f16=False)
    return matmul_exact(raw, qtype, x)


@pytest.mark.parametrize("numerics", [LLAMACPP, EXACT], ids=["llamacpp", "exact"])
@pytest.mark.parametrize("qtype", QUANTS, ids=lambda q: q.name)
def test_matmul_matches_reference(qtype, numerics):
    """Every format, through the TritonKernels' matmul (the input rounding of the numerics included), at
    gemv and gemm row counts, on 37 rows (partial row tiles) and K of one block and of three."""
    rng = np.random.default_rng(int(qtype) * 11 + (numerics is LLAMACPP))
    block = FORMATS[int(qtype)].block
    for n_cols in (block, 3 * block):
        raw = random_quantized(qtype, 37, n_cols, rng)
        w = QWeight.from_numpy(raw, qtype, 37, n_cols, name=f"w.{qtype.name}").to(DEVICE)
        x_all = (rng.standard_normal((max(ROWS_M), n_cols)) * rng.uniform(0.1, 10, (max(ROWS_M), 1))).astype(np.float32)
        x_all[0, :32] = 0.0
        for m in ROWS_M:
            x = x_all[:m]
            ref, scale = _reference(raw, qtype, x, numerics)
            y = _qmatmul_on_kernels(torch.from_numpy(x).to(DEVICE), w, numerics)
            assert y.shape == (m, 37) and y.dtype == torch.float32
            _check(y, ref, scale, _bound_units(n_cols, m, numerics is LLAMACPP),
                   f"{qtype.name} K={n_cols} M={m} {numerics.mode}")


def _qmatmul_on_kernels(x, w, numerics, wide=False):
    """A matmul on the TritonKernels (their input rounding included), asserting the Triton kernels
    computed it (on a CPU they run interpreted)."""
    kernels = Counting(TritonKernels(numerics, DEVICE))
    y = kernels.matmul(x, w, wide)
    assert kernels.counts == {"triton": 1}, kernels.counts
    return y


@pytest.mark.parametrize("qtype", [q for q in QUANTS if q in F16_FIELDS], ids=lambda q: q.name)
def test_edge_scales(qtype):
    """Zero, negative zero, the smallest and largest subnormal and the largest finite f16 in every f16
    field, next to ordinary blocks: the two-byte assembly of each field, at odd and even offsets."""
    rng = np.random.default_rng(int(qtype) + 5)
    f = FORMATS[int(qtype)]
    n_cols = f.block * 5
    raw = random_quantized(qtype, 20, n_cols, rng)
    blocks = raw.reshape(-1, f.block_bytes)
    edges = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x7BFF], dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    for i in range(0, blocks.shape[0], 3):
        for off in F16_FIELDS[qtype]:
            blocks[i, off:off + 2] = edges[(i // 3 + off) % len(edges)]
    x = rng.standard_normal((3, n_cols)).astype(np.float32)
    ref, scale = matmul_exact(raw, qtype, x)
    assert np.isfinite(ref).all()
    _check(_run(raw, qtype, x, fp16_gemm=False), ref, scale, 8 + n_cols, f"{qtype.name} edge scales")


@pytest.mark.parametrize("numerics", [LLAMACPP, EXACT], ids=["llamacpp", "exact"])
def test_mxfp4_extreme_exponents(numerics):
    """MXFP4 (no f16 field; an E8M0 exponent byte) at the ends of its range: rows of blocks with e = 0..5
    (scales 2^-128 .. 2^-123, the first two float32 subnormals), rows with e = 200..205 (2^72 .. 2^77,
    weights fp16 cannot hold), rows mixing both, through the gemv (1, 3, 16 x rows) and the gemm (40: fp16
    operands under llamacpp numerics, float32 under exact), on 5 blocks a row (85 bytes: every other
    row and block starts at an odd byte).

    The bound is _check's plus an absolute (8 + K) * 2^-149, as for the torch path
    (tests/test_kernels.py test_mxfp4_extreme_exponents): where products are float32 subnormals, each
    operation is exact only to 2^-150. The reference is the exact product of the operands (under
    llamacpp numerics of the q8_0-rounded input), which the Triton path promises, not ggml's rounded
    float32 block scale d_x * 2^(e - 128) (kernel_reference.matmul_llamacpp_mxfp4)."""
    rng = np.random.default_rng(139 + (numerics is LLAMACPP))
    n_rows, n_blocks = 37, 5
    n_cols = 32 * n_blocks
    blocks = rng.integers(0, 256, (n_rows, n_blocks, 17), dtype=np.uint8)
    small, large = np.arange(0, 6), np.arange(200, 206)
    for r in range(n_rows):
        blocks[r, :, 0] = rng.choice((small, large, np.concatenate([small, large]))[r % 3], n_blocks)
    blocks[0, :, 0] = (0, 1, 0, 1, 0)                   # only the two subnormal scales
    blocks[1, :, 0] = (205, 204, 205, 204, 205)
    raw = blocks.reshape(n_rows, -1)
    w = QWeight.from_numpy(raw, Q.MXFP4, n_rows, n_cols, name="w.MXFP4").to(DEVICE)
    x_all = (rng.standard_normal((40, n_cols)) * 10.0 ** rng.uniform(-3, 1, (40, 1))).astype(np.float32)
    x_all[0, :32] = 0.0
    x_all[1] *= 1e-3 / np.abs(x_all[1]).max()
    for m in (1, 3, 16, 40):
        x = x_all[:m]
        ref, scale = _reference(raw, Q.MXFP4, x, numerics)
        assert np.isfinite(ref).all() and np.isfinite(scale).all()
        y = _qmatmul_on_kernels(torch.from_numpy(x).to(DEVICE), w, numerics)
        err = np.abs(y.cpu().numpy().astype(np.float64) - ref)
        bound = _bound_units(n_cols, m, numerics is LLAMACPP) * EPS32 * scale + (8 + n_cols) * 2.0 ** -149
        worst = float((err / bound).max())
        assert worst <= 1.0, f"MXFP4 extreme exponents M={m} {numerics.mode}: error {err.max():.3g} is {worst:.2f} x the bound"


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q6_K, Q.Q4_K, Q.IQ4_XS, Q.Q2_K, Q.Q3_K], ids=lambda q: q.name)
def test_split_k_ranges_add_up(qtype):
    """The gemv's K ranges (split-K) give the unsplit result, on both gemv kernels (gemv.py's word
    kernel: a unit of a block, half a block, a whole block, an eighth; the per-element one for Q2_K
    and Q3_K): 7 ranges of a K that is no multiple of 7 steps (so ranges start inside blocks), one
    range per step, and more ranges asked than K has steps."""
    rng = np.random.default_rng(3)
    n_cols = FORMATS[int(qtype)].block * 8
    raw = random_quantized(qtype, 20, n_cols, rng)     # at 16 x rows: a full tile of 16 and a partial one
    step = UNITS[int(qtype)][0] if int(qtype) in UNITS else gemv_blocks(1)[2]
    # the smallest and largest gemv row buckets; one range per step (the most programs, and the
    # interpreter is slow) and the clamp at one row
    for m, ranges in ((1, (1, 2, 7, n_cols // step)), (16, (1, 7))):
        x = rng.standard_normal((m, n_cols)).astype(np.float32)
        ref, scale = matmul_exact(raw, qtype, x)
        for splits in ranges:
            y = _run(raw, qtype, x, False, splits=splits)
            _check(y, ref, scale, 8 + n_cols, f"{splits} splits, M={m}")
        if m == 1:   # more ranges than K has steps: clamped to one per step, the same launch as the last
            assert torch.equal(_run(raw, qtype, x, False, splits=10 * n_cols), y)


def test_wide_output_is_float64_of_the_same_sums():
    rng = np.random.default_rng(4)
    raw = random_quantized(QUANTS[0], 8, 64, rng)
    w = QWeight.from_numpy(raw, QUANTS[0], 8, 64).to(DEVICE)
    x = torch.from_numpy(rng.standard_normal((2, 64)).astype(np.float32)).to(DEVICE)
    y = _qmatmul_on_kernels(x, w, EXACT, wide=True)
    assert y.dtype == torch.float64
    assert torch.equal(y.float(), _qmatmul_on_kernels(x, w, EXACT))


def test_block_choices():
    """The per-element gemv's tile: BLOCK_M rows of x rounded up to a power of two, a (32, 32) weight tile
    per step up to 4 x rows and (16, 32) from 8; the word kernel's rows per program shrink as x rows
    grow; K split only where the rows give too few programs."""
    assert [gemv_blocks(m)[0] for m in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert [gemv_blocks(m)[1:] for m in (1, 4, 8, 16)] == [(32, 32), (32, 32), (16, 32), (16, 32)]
    assert [words_blocks(2, m) for m in (1, 3, 16)] == [(1, 128), (4, 32), (16, 16)]
    assert words_blocks(13, 1) == (1, 32) and words_blocks(12, 2) == (2, 16)
    assert words_blocks(14, 1) == (1, 64)
    assert k_splits(34000, 32, 64, 132) == 1               # 532 programs already fill 132 SMs 4 times
    assert k_splits(32000, 32, 64, 132) == 2               # 500 do not quite
    assert k_splits(2048, 88, 64, 132) == 11               # 32 programs: 528 wanted, at most 88 / 8 steps
    assert k_splits(256, 32, 64, 132) == 4                 # short rows: each range keeps 8 steps
    assert k_splits(64, 1, 64, 132) == 1


def test_who_serves_what(monkeypatch):
    """A CUDA device gets the Triton kernels: block weights go to Triton, float weights to torch; a CUDA
    machine whose Triton cannot load counts its matmuls as a fallback; other accelerators run torch."""
    rng = np.random.default_rng(5)
    q = QWeight.from_numpy(random_quantized(QUANTS[0], 4, 32, rng), QUANTS[0], 4, 32)
    f16 = QWeight.from_numpy((rng.standard_normal((4, 32)) * 0.1).astype(np.float16), 1, 4, 32)
    cuda = choose_kernels("cuda", EXACT)
    assert cuda.name == "triton" and cuda.path(q) == "triton" and cuda.path(f16) == "torch"
    monkeypatch.setattr(gpu, "_state", {"ok": False})
    assert choose_kernels("cuda", EXACT).path(q) == "triton:fallback"
    assert choose_kernels("mps", EXACT).path(q) == "torch"
    monkeypatch.setenv("TENSORSPLIT_TRITON", "0")
    assert choose_kernels("cuda", EXACT).path(q) == "torch"     # turned off on purpose: no fallback


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    from gguf import GGMLQuantizationType as Q
    types = {"token_embd": Q.Q6_K, "attn_q": Q.Q4_0, "attn_k": Q.Q4_K, "attn_v": Q.Q8_0, "attn_output": Q.Q5_K,
             "ffn_gate": Q.Q4_1, "ffn_up": Q.Q5_0, "ffn_down": Q.Q6_K, "output": Q.Q8_0}
    return write_model(tmp_path_factory.mktemp("tk") / "mixed.gguf", "llama", n_layers=2, n_embd=256, n_heads=4,
                       n_kv=2, n_ff=512, vocab=256, types=types, tied=False, init="fan_in", seed=2)


def test_model_on_the_kernels_matches_the_torch_path(mixed_file, monkeypatch):
    """A llama file of mixed formats: prompt logits (gemm) and two decode steps (gemv) with every matmul
    on the Triton kernels, against the same model on the torch path (exact numerics)."""
    from tensorsplit.model import make_plan, open_model
    from tensorsplit.model.layers import no_reduce
    from tensorsplit.model.transformer import RankModel

    def run(device, triton: bool):
        kernels = Counting(TritonKernels(EXACT, device) if triton else TorchKernels(EXACT, device))
        gf, cfg = open_model(mixed_file)
        m = RankModel(cfg, make_plan(cfg, gf.tensors, 1).ranks[0], 1, no_reduce, gf, kernels)
        m.allocate_cache(1, 64)
        ids = torch.tensor([5, 17, 200, 3, 99, 42, 7, 8, 1, 250, 11, 12, 13, 14, 15, 16, 18, 19, 20, 21])
        out = [m.forward(ids, torch.arange(20), torch.zeros(20, dtype=torch.int64)).cpu()]
        for step, t in enumerate((31, 77)):
            out.append(m.forward(torch.tensor([t]), torch.tensor([20 + step]), torch.tensor([0])).cpu())
        return out, dict(kernels.counts)

    ref, ref_paths = run(torch.device("cpu"), triton=False)
    got, got_paths = run(DEVICE, triton=True)
    assert set(ref_paths) == {"torch"} and set(got_paths) == {"triton"}, (ref_paths, got_paths)
    for i, (a, b) in enumerate(zip(ref, got)):
        diff = float((a - b).abs().max())
        # seen 1e-6 (interpreter); float32 sums in another order, through 2 layers
        assert diff <= 1e-4 * float(a.abs().max()), f"step {i}: max |diff| {diff:.3g}"
        assert torch.equal(a.argmax(-1), b.argmax(-1))

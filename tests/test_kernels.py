"""The quantized matmuls, native kernels and torch fallback, against an independent reference
(tests/kernel_reference.py: gguf-py's dequantization, a float64 product, and a NumPy transcription of
llama.cpp's activation quantization).

Tolerances. The reference is exact (float64, and for llama.cpp's numerics the integer block dots are
exact too); the kernels differ from it only by float32 roundings: per scale group a few products and
one accumulation (integer numerics: ~4 roundings; exact numerics: the group's GS fused multiply-adds
as well), so |y - ref| <= (c + k * n_groups) * 2^-24 * sum(|w| |x|), with c, k in _factor. The torch
fallback sums a whole row in float32 (the BLAS), so its bound grows with the row length instead.
An error in a bit field, a scale or a block order is larger by orders of magnitude.

The native kernels must also be: bitwise the same at 1 and 2 threads, for any number of token rows
in a call, on a rank's row shard as on the unsharded weight, and across the AVX-512 / AVX2 / scalar
paths; and the repacking to their layout must be lossless.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kernel_reference import EPS32, matmul_exact, matmul_llamacpp
from synthetic import random_quantized
from tensorsplit import kernels
from tensorsplit.kernels.layout import FORMATS
from tensorsplit.kernels.numerics import EXACT, LLAMACPP
from tensorsplit.kernels.quants import QWeight
from tensorsplit.kernels.torch_kernels import TorchKernels

QUANTS = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS,
          Q.MXFP4]
FLOATS = [Q.F16, Q.BF16]
ROWS_M = (1, 2, 3, 4, 7, 16, 128)
MIN_TASK_BYTES = 64 * 1024     # weight bytes per thread at least (csrc/ops.cpp grain_for)
# byte offsets of each format's f16 scale fields inside a block (d, and dmin / m where there is one);
# MXFP4's scale is an E8M0 byte instead (test_mxfp4_extreme_exponents)
F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.IQ4_NL: (0,),
              Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_XS: (0,)}


def _native_or_skip():
    if not kernels.native():
        pytest.fail("the native kernels did not build (see the warning above)")


@pytest.fixture(params=["native", "torch"])
def backend(request):
    """Each test runs on the native kernels and on the torch fallback (GGUF layout, no extension)."""
    if request.param == "native":
        _native_or_skip()
    return request.param


def _weight(raw: np.ndarray, qtype, n_cols: int, backend: str) -> QWeight:
    w = QWeight.from_numpy(raw, qtype, raw.shape[0], n_cols, name=f"w.{qtype.name}")
    return w.to_tiles() if backend == "native" else w


def _kernels(w: QWeight, numerics):
    """The kernels that multiply w: the native ones for a tiled weight, the torch reference for GGUF blocks."""
    if w.layout == "tiles":
        from tensorsplit.kernels.native_kernels import NativeKernels
        return NativeKernels(numerics)
    return TorchKernels(numerics)


def qmatmul(x, w: QWeight, numerics, wide: bool = False) -> torch.Tensor:
    return _kernels(w, numerics).matmul(x, w, wide)


def _raw(qtype, n_rows, n_cols, rng) -> np.ndarray:
    if qtype == Q.F16:
        return (rng.standard_normal((n_rows, n_cols)) * 0.05).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        bits = ((rng.standard_normal((n_rows, n_cols)) * 0.05).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(np.uint8)
    return random_quantized(qtype, n_rows, n_cols, rng)


def _check(y: torch.Tensor, ref: np.ndarray, scale: np.ndarray, factor: float, what: str) -> None:
    err = np.abs(y.numpy().astype(np.float64) - ref)
    bound = factor * EPS32 * scale + 1e-30
    worst = float((err / bound).max())
    assert worst <= 1.0, f"{what}: error {err.max():.3g} is {worst:.2f} x the bound ({factor:g} * 2^-24 * sum|w||x|)"


def _factor(qtype, n_cols: int, numerics, backend: str) -> float:
    f = FORMATS[int(qtype)]
    n_groups = n_cols // f.group
    if backend == "torch" or f.act is None:
        # float32 weights times float32 inputs summed over the whole row (the BLAS on the torch path;
        # one fma per column for F16 / BF16), after the inputs were rounded once (llamacpp numerics)
        return 8 + n_cols
    return 8 + 2 * n_groups if numerics is LLAMACPP else 8 + f.group + 2 * n_groups


def _cols(qtype) -> list[int]:
    """The smallest legal row and odd multiples of the block."""
    block = FORMATS[int(qtype)].block
    if block == 1:
        return [16, 48, 208]
    return [block, 3 * block, 5 * block]


@pytest.mark.parametrize("numerics", [LLAMACPP, EXACT], ids=["llamacpp", "exact"])
@pytest.mark.parametrize("qtype", QUANTS + FLOATS, ids=lambda q: q.name)
def test_matmul_matches_reference(qtype, numerics, backend):
    rng = np.random.default_rng(int(qtype) * 7 + (numerics is LLAMACPP))
    for n_cols in _cols(qtype):
        raw = _raw(qtype, 37, n_cols, rng)                      # 37 rows: two full tiles and a partial one
        w = _weight(raw, qtype, n_cols, backend)
        x_all = (rng.standard_normal((max(ROWS_M), n_cols)) * rng.uniform(0.1, 10, (max(ROWS_M), 1))).astype(np.float32)
        x_all[0, :32] = 0.0                                     # an all-zero activation block
        for m in ROWS_M:
            x = x_all[:m]
            if numerics is LLAMACPP:
                ref, scale = matmul_llamacpp(raw, qtype, x, q8_1_sum_f16=backend == "native")
            else:
                ref, scale = matmul_exact(raw, qtype, x)
            y = qmatmul(torch.from_numpy(x), w, numerics)
            assert y.shape == (m, 37)
            _check(y, ref, scale, _factor(qtype, n_cols, numerics, backend), f"{qtype.name} K={n_cols} M={m} {numerics.mode}")


EPS64 = 2.0 ** -53


@pytest.mark.parametrize("numerics", [LLAMACPP, EXACT], ids=["llamacpp", "exact"])
@pytest.mark.parametrize("qtype", QUANTS + FLOATS, ids=lambda q: q.name)
def test_wide_kernels_match_a_float64_reference(qtype, numerics):
    """The wide (float64) kernels that row-parallel layers use for their partial sums (model/layers.py),
    against the float64 reference, with bounds that only float64 accumulation meets:
      integer numerics: each group's integer dot is exact, and its scale product (a float32 weight scale
        times a float32 activation scale) is exact in float64, so the result is the reference up to
        float64 roundings, (8 + 2 K) * 2^-53 * sum|w||x|, some 2^29 times below the float32 kernels';
      F16 / BF16: every product of a half and a float32 is exact in float64: the same bound;
      float activations on block formats: each group's float32 sum of code * x, then float64:
        (8 + group) * 2^-24 per group, with no float32 accumulation across groups."""
    _native_or_skip()
    rng = np.random.default_rng(int(qtype) * 11 + (numerics is LLAMACPP))
    f = FORMATS[int(qtype)]
    for n_cols in _cols(qtype):
        raw = _raw(qtype, 37, n_cols, rng)
        w = _weight(raw, qtype, n_cols, "native")
        x = (rng.standard_normal((7, n_cols)) * rng.uniform(0.1, 10, (7, 1))).astype(np.float32)
        ref, scale = (matmul_llamacpp(raw, qtype, x) if numerics is LLAMACPP else matmul_exact(raw, qtype, x))
        y = qmatmul(torch.from_numpy(x), w, numerics, wide=True)
        assert y.dtype == torch.float64 and y.shape == (7, 37)
        if numerics is LLAMACPP or f.act is None:
            bound = (8 + 2 * n_cols) * EPS64 * scale
        else:
            bound = (8 + f.group) * EPS32 * scale + (8 + 2 * n_cols) * EPS64 * scale
        err = np.abs(y.numpy() - ref)
        worst = float((err / (bound + 1e-300)).max())
        assert worst <= 1.0, f"{qtype.name} K={n_cols} {numerics.mode}: wide error {err.max():.3g} is {worst:.2f} x its bound"


@pytest.mark.parametrize("numerics", [LLAMACPP, EXACT], ids=["llamacpp", "exact"])
@pytest.mark.parametrize("qtype", [q for q in QUANTS if q in F16_FIELDS], ids=lambda q: q.name)
def test_edge_scales(qtype, numerics, backend):
    """Blocks whose f16 scales are zero, negative zero, the smallest and largest subnormals and the
    largest finite f16, next to ordinary blocks."""
    rng = np.random.default_rng(int(qtype))
    n_cols = FORMATS[int(qtype)].block * 5
    raw = random_quantized(qtype, 20, n_cols, rng)
    bs = FORMATS[int(qtype)].block_bytes
    blocks = raw.reshape(-1, bs)
    edges = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x7BFF], dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    for i in range(blocks.shape[0]):
        if i % 3 == 0:
            for off in F16_FIELDS[qtype]:
                blocks[i, off:off + 2] = edges[(i // 3 + off) % len(edges)]
    w = _weight(raw, qtype, n_cols, backend)
    x = rng.standard_normal((3, n_cols)).astype(np.float32)
    ref, scale = (matmul_llamacpp(raw, qtype, x, q8_1_sum_f16=backend == "native") if numerics is LLAMACPP
                  else matmul_exact(raw, qtype, x))
    assert np.isfinite(ref).all()
    _check(qmatmul(torch.from_numpy(x), w, numerics), ref, scale, _factor(qtype, n_cols, numerics, backend),
           f"{qtype.name} edge scales {numerics.mode}")


@pytest.mark.parametrize("numerics", [LLAMACPP, EXACT], ids=["llamacpp", "exact"])
def test_mxfp4_extreme_exponents(numerics, backend):
    """MXFP4 blocks of random codes whose E8M0 exponents sit at the ends of the range: rows of scales
    2^-128 .. 2^-123 (e = 0, 1: subnormal float32 scales), rows of 2^67 .. 2^77 (e near 200), rows
    mixing those with e = 120 .. 135 and 230, at token rows 1-16 and 128.

    The bound is _check's plus an absolute (8 + K) * 2^-149: where weights times inputs are float32
    subnormals, each product or sum is exact only to 2^-150 (the torch path's K products, the native
    path's few operations per block). Under llama.cpp's numerics the reference is ggml's formula with
    its float32 block scale d_x * 2^(e - 128), which is itself subnormal for small e and then not the
    exact product (kernel_reference.matmul_llamacpp_mxfp4); the native kernels compute that product
    as ggml does, the torch path the exact one (to within its bound of the dequantized operands)."""
    from kernel_reference import matmul_llamacpp_mxfp4
    rng = np.random.default_rng(39 + (numerics is LLAMACPP))
    n_rows, n_cols = 37, 5 * 32
    blocks = rng.integers(0, 256, (n_rows, n_cols // 32, 17), dtype=np.uint8)
    small = np.arange(0, 6)
    large = np.arange(195, 206)
    mixed = np.concatenate([small, np.arange(120, 136), [200, 230]])
    for r in range(n_rows):
        blocks[r, :, 0] = rng.choice((small, large, mixed)[r % 3], n_cols // 32)
    blocks[0, :, 0] = (0, 1, 2, 0, 1)                   # the two subnormal scales, several times
    blocks[1, :, 0] = 200
    raw = blocks.reshape(n_rows, -1)
    w = _weight(raw, Q.MXFP4, n_cols, backend)
    # token rows of 10^-3 .. 10: against the small scales, d_x * 2^(e - 128) then needs more bits than a
    # subnormal has, and ggml's rounding of it shows (the exact product as the reference fails the bound several times over)
    x_all = (rng.standard_normal((128, n_cols)) * 10.0 ** rng.uniform(-3, 1, (128, 1))).astype(np.float32)
    x_all[0, :32] = 0.0
    x_all[1] *= 1e-3 / np.abs(x_all[1]).max()
    for m in list(range(1, 17)) + [128]:
        x = x_all[:m]
        if numerics is LLAMACPP:
            ref, scale = matmul_llamacpp(raw, Q.MXFP4, x)
            if backend == "native":
                ref = matmul_llamacpp_mxfp4(raw, x)
        else:
            ref, scale = matmul_exact(raw, Q.MXFP4, x)
        assert np.isfinite(ref).all() and np.isfinite(scale).all()
        y = qmatmul(torch.from_numpy(x), w, numerics)
        err = np.abs(y.numpy().astype(np.float64) - ref)
        bound = _factor(Q.MXFP4, n_cols, numerics, backend) * EPS32 * scale + (8 + n_cols) * 2.0 ** -149
        worst = float((err / bound).max())
        assert worst <= 1.0, f"MXFP4 extreme exponents M={m} {numerics.mode}: error {err.max():.3g} is {worst:.2f} x the bound"
        if backend == "native":                         # subnormal scales: the same bits on every instruction set
            ops = torch.ops.tensorsplit
            for isa in ("avx512", "avx2", "scalar"):
                try:
                    before = ops.use_isa(isa)
                except RuntimeError as e:
                    assert "does not have those instructions" in str(e)
                    continue
                try:
                    other = qmatmul(torch.from_numpy(x), w, numerics)
                finally:
                    ops.use_isa(before)
                assert torch.equal(other, y), f"MXFP4 extreme exponents M={m} {numerics.mode}: {isa} vs {before}"


@pytest.mark.parametrize("qtype", QUANTS + FLOATS, ids=lambda q: q.name)
def test_repack_is_lossless(qtype):
    _native_or_skip()
    rng = np.random.default_rng(3)
    n_cols = _cols(qtype)[1]
    raw = _raw(qtype, 45, n_cols, rng)
    w = _weight(raw, qtype, n_cols, "native")
    ops = torch.ops.tensorsplit
    back = ops.unpack_rows(w.data, int(qtype), 45, n_cols, torch.arange(45))
    assert torch.equal(back, torch.from_numpy(np.ascontiguousarray(raw)).view(torch.uint8).reshape(45, -1))
    # resident bytes: whole tiles of 16 rows, and at most 4% more for the widened K-quant scales
    f = FORMATS[int(qtype)]
    assert w.nbytes == 3 * (n_cols // f.block) * f.tile_block
    assert f.tile_block <= 1.04 * 16 * f.block_bytes


@pytest.mark.parametrize("qtype", QUANTS + FLOATS, ids=lambda q: q.name)
def test_native_results_do_not_depend_on_threads_rows_shards_or_isa(qtype):
    _native_or_skip()
    rng = np.random.default_rng(5)
    n_cols = _cols(qtype)[2]
    # threads take whole tiles, at least MIN_TASK_BYTES of them each (ops.cpp grain_for): enough tiles
    # for 2 threads to both run, and a last tile that is not full
    f = FORMATS[int(qtype)]
    grain = max(1, MIN_TASK_BYTES // (n_cols // f.block * f.tile_block))
    n_rows = 16 * (2 * grain + 2) + 5
    raw = _raw(qtype, n_rows, n_cols, rng)
    w = _weight(raw, qtype, n_cols, "native")
    x = torch.from_numpy(rng.standard_normal((19, n_cols)).astype(np.float32))
    ops = torch.ops.tensorsplit
    threads = torch.get_num_threads()
    for numerics in (LLAMACPP, EXACT):
        torch.set_num_threads(1)
        one = qmatmul(x, w, numerics)
        assert ops.matmul_threads() == 1
        torch.set_num_threads(2)
        try:
            two = qmatmul(x, w, numerics)
            assert ops.matmul_threads() == 2, f"{qtype.name}: 2 threads asked for, {ops.matmul_threads()} ran"
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, two), f"{qtype.name} {numerics.mode}: 1 vs 2 threads"
        # each token row alone gives the same bits as in a batch of 19
        rows = torch.cat([qmatmul(x[i:i + 1], w, numerics) for i in range(19)])
        assert torch.equal(rows, one), f"{qtype.name} {numerics.mode}: batch composition"
        # a rank's row shard (not on a tile boundary) gives the slice of the unsharded result
        shard = _weight(raw[37:141], qtype, n_cols, "native")
        assert torch.equal(qmatmul(x, shard, numerics), one[:, 37:141]), f"{qtype.name} {numerics.mode}: shard"
        for isa in ("avx2", "scalar"):
            before = ops.use_isa(isa)
            try:
                other = qmatmul(x, w, numerics)
            finally:
                ops.use_isa(before)
            assert torch.equal(other, one), f"{qtype.name} {numerics.mode}: {isa} vs {before}"


@pytest.mark.parametrize("env,want", [({"TENSORSPLIT_ISA": "scalar"}, "scalar"), ({"TENSORSPLIT_NATIVE": "0"}, "torch")])
def test_environment_picks_the_isa_or_turns_the_kernels_off(env, want):
    """README: TENSORSPLIT_ISA picks a lower instruction set, TENSORSPLIT_NATIVE=0 turns the native
    kernels off (silently: it is asked for, not a failure)."""
    import os
    import subprocess
    import sys
    _native_or_skip()
    r = subprocess.run([sys.executable, "-c", "from tensorsplit import kernels; print(kernels.isa())"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert r.returncode == 0 and r.stdout.strip() == want, r.stdout + r.stderr
    assert r.stderr.strip() == ""


def test_use_isa_returns_a_name_it_takes_back():
    """use_isa(name) returns the instruction set it replaced, in a form use_isa accepts, so a test can
    restore it; a level this CPU lacks is refused for that reason, not as an unknown name."""
    _native_or_skip()
    ops = torch.ops.tensorsplit
    start = ops.isa()
    for name in ("scalar", "avx2", "avx512", "avx512-vnni", "auto"):
        try:
            before = ops.use_isa(name)
        except RuntimeError as e:
            assert "does not have those instructions" in str(e), (name, str(e))
            continue
        try:
            switched = ops.isa()
            assert before == start
            assert ops.use_isa(before) == switched      # the name isa() gave is taken back
            assert ops.isa() == start
        finally:
            ops.use_isa(start)       # not "auto": TENSORSPLIT_ISA may have chosen a lower one
    with pytest.raises(RuntimeError, match="expected scalar, avx2, avx512 or auto"):
        ops.use_isa("sse9")


def test_torch_fallback_when_the_kernels_cannot_build(tmp_path):
    """No compiler: one warning line, and the model still runs (on the torch path)."""
    import subprocess
    import sys
    code = ("from tensorsplit import kernels; import sys; ok = kernels.native(); "
            "print('native', ok); sys.exit(0 if not ok else 3)")
    env = {"TENSORSPLIT_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler"), "PATH": "/usr/bin:/bin"}
    import os
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(warnings) == 1 and "native kernels unavailable" in warnings[0] and "compiler" in warnings[0], proc.stderr


def test_path_counts_show_the_native_kernels_ran_and_catch_a_fallback(monkeypatch):
    """The counts name what computed each matmul (a fallback gives the same numbers to float32
    rounding, so only they can show it): native on tiled weights; when the library could not load,
    weights stay in GGUF layout and every CPU matmul counts as native:fallback, which fails the check."""
    from fast_path import assert_fast_path
    from tensorsplit.kernels.choice import choose_kernels
    from tensorsplit.kernels.counting import Counting
    _native_or_skip()
    rng = np.random.default_rng(9)
    raw = random_quantized(Q.Q4_0, 32, 64, rng)
    x = torch.from_numpy(rng.standard_normal((2, 64)).astype(np.float32))
    for numerics in (LLAMACPP, EXACT):
        cpu = Counting(choose_kernels("cpu", numerics))
        assert cpu.name == "native"
        cpu.matmul(x, cpu.load(QWeight.from_numpy(raw, Q.Q4_0, 32, 64)))
        assert_fast_path(cpu.counts, "native", exclusive=True)
    cpu.counts.clear()
    cpu.matmul(x, _weight(raw, Q.Q4_0, 64, "torch"))
    assert cpu.counts == {"torch": 1}               # asked for: a weight built in GGUF layout
    monkeypatch.setitem(kernels._state, "ok", False)  # as after a failed build
    fallen = Counting(choose_kernels("cpu", LLAMACPP))
    fallen.matmul(x, fallen.load(QWeight.from_numpy(raw, Q.Q4_0, 32, 64)))
    assert fallen.counts == {"native:fallback": 1}
    with pytest.raises(AssertionError, match="never ran"):
        assert_fast_path(fallen.counts, "native")
    monkeypatch.setenv("TENSORSPLIT_NATIVE", "0")     # turned off on purpose: not a fallback
    assert choose_kernels("cpu", LLAMACPP).path(_weight(raw, Q.Q4_0, 64, "torch")) == "torch"


def test_ops_have_consistent_fake_implementations():
    """torch.library.opcheck: each op's schema, its fake (meta) implementation and its real one agree,
    so torch.compile and other tracers can pass through the native ops."""
    _native_or_skip()
    ops = torch.ops.tensorsplit
    rng = np.random.default_rng(11)
    raw = torch.from_numpy(random_quantized(Q.Q4_K, 20, 256, rng))
    tiles = ops.repack(raw, int(Q.Q4_K), 256)
    x = torch.randn(3, 256)
    xq = ops.quantize_act(x, 2, 32)
    checks = [
        (ops.repack.default, (raw, int(Q.Q4_K), 256)),
        (ops.quantize_act.default, (x, 2, 32)),
        (ops.group_sums.default, (x, 32)),
        (ops.matmul_q8.default, (tiles, int(Q.Q4_K), 20, 256, xq, False)),
        (ops.matmul_q8.default, (tiles, int(Q.Q4_K), 20, 256, xq, True)),
        (ops.quantize_matmul_q8.default, (tiles, int(Q.Q4_K), 20, 256, x, 2, 32, True)),
        (ops.matmul_f32.default, (tiles, int(Q.Q4_K), 20, 256, x, ops.group_sums(x, 32), False)),
        (ops.rms_norm.default, (x, torch.randn(256), 1e-5)),
        (ops.rope.default, (torch.randn(3, 4, 64), torch.tensor([0, 5, 9]), torch.randn(16, 32), torch.randn(16, 32),
                            True, 64)),
        (ops.unpack_rows.default, (tiles, int(Q.Q4_K), 20, 256, torch.tensor([3, 19]))),
        (ops.add_rms_norm.default, (x, x.double(), None, torch.randn(256), 1e-5)),
        (ops.add_rms_norm.default, (x, x, torch.randn(256), torch.randn(256), 1e-5)),
        (ops.qkv_heads.default, (torch.randn(3, 256), torch.randn(3, 128), torch.randn(3, 128), torch.tensor([0, 5, 9]),
                                 torch.randn(16, 32), torch.randn(16, 32), True, 64, torch.randn(64), torch.randn(64),
                                 1e-6, 4, 2)),
        (ops.qkv_heads.default, (torch.randn(3, 512), None, None, torch.tensor([0, 5, 9]), torch.randn(16, 32),
                                 torch.randn(16, 32), False, 64, None, None, 1e-6, 4, 2)),
        (ops.glu.default, (x, torch.randn(3, 256), 0, None)),
        (ops.glu.default, (torch.randn(3, 512), None, 1, torch.randn(1 << 16))),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_a_build_killed_midway_does_not_block_the_next(tmp_path, monkeypatch):
    """A compile that was killed leaves cpp_extension's lock file behind, on which the next build would
    wait forever; the builder holds an flock instead (dropped by the kernel when a holder dies) and
    clears that file under it. The compiler itself is replaced here: this checks the locking only."""
    from torch.utils import cpp_extension
    from tensorsplit.kernels import build
    where = tmp_path / "kernels"
    where.mkdir()
    (where / "lock").write_text("")                      # what a killed build leaves
    monkeypatch.setattr(build, "build_dir", lambda: where)
    monkeypatch.setattr(build, "_ninja_on_path", lambda: None)
    seen = []

    def fake_load(name, sources, build_directory, **kw):
        seen.append((where / "lock").exists())
        (where / f"{name}.so").write_bytes(b"")
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    lib = build.load_library(announce=False)
    assert seen == [False] and lib.exists() and (where / build.OK_MARK).exists()

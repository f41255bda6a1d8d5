"""The native ops that do in one call what a layer did in several (csrc/elementwise.cpp), against the
calls they replace: the residual add with the next norm, the heads' norm and rope, the gated activation,
and projections stacked into one weight. Each fused op computes the same float operations in the same
order, so it is compared bit for bit, except SiLU, whose exp is a polynomial of its own rather than
torch's (compared with a float64 reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from synthetic import random_quantized
from tensorsplit import kernels
from tensorsplit.kernels.native_kernels import NativeKernels
from tensorsplit.kernels.numerics import EXACT, LLAMACPP
from tensorsplit.kernels.quants import QWeight
from tensorsplit.kernels.torch_kernels import TorchKernels, gelu_tanh_like_ggml
from tensorsplit.model.rope import Rope


@pytest.fixture(scope="module")
def native():
    if not kernels.native():
        pytest.fail("the native kernels did not build (see the warning above)")
    return NativeKernels(LLAMACPP)


def _unfused(native: NativeKernels):
    """The reference composition (TorchKernels' methods) over the native single ops."""
    class Unfused(TorchKernels):
        rms_norm = staticmethod(native.rms_norm)
        rope = staticmethod(native.rope)
    return Unfused(LLAMACPP)


@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("wide,post", [(True, False), (False, False), (True, True)])
def test_add_rms_norm_is_the_add_and_norms(native, n, wide, post):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 576, generator=g) * 30
    a = torch.randn(n, 576, generator=g, dtype=torch.float64) * 7
    a = a if wide else a.float()
    w, aw = torch.randn(576, generator=g), torch.randn(576, generator=g) if post else None
    s, h = native.add_rms_norm(x, a, w, 1e-6, aw)
    s_ref, h_ref = _unfused(native).add_rms_norm(x, a, w, 1e-6, aw)
    assert s.dtype == h.dtype == torch.float32
    assert torch.equal(s, s_ref) and torch.equal(h, h_ref)
    # and the unfused composition against float64 arithmetic
    a64 = a.double() if aw is None else torch.from_numpy(_norm64(a.float().numpy(), aw.numpy()))
    s64 = x.double() + a64
    np.testing.assert_allclose(h.numpy(), _norm64(s64.numpy(), w.numpy()), rtol=1e-5, atol=1e-5)


def _norm64(x: np.ndarray, w: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("rope_dim", [64, 48])
def test_qkv_heads_is_the_reshape_norm_and_rope(native, neox, qk_norm, rope_dim):
    """From views of one fused projection (rows strided), and from the fused projection itself."""
    n, H, KH, hd = 5, 6, 2, 64
    g = torch.Generator().manual_seed(rope_dim + neox)
    fused = torch.randn(n, (H + 2 * KH) * hd, generator=g)
    q, k, v = fused.split([H * hd, KH * hd, KH * hd], -1)
    rope = Rope(hd, rope_dim, 10000.0, neox).build(32, native)
    positions = torch.tensor([0, 3, 4, 17, 31])
    norms = (torch.randn(hd, generator=g), torch.randn(hd, generator=g)) if qk_norm else (None, None)
    want = _unfused(native).qkv_heads(q, k, v, (H, KH), positions, rope, *norms, 1e-6)
    for got in (native.qkv_heads(q, k, v, (H, KH), positions, rope, *norms, 1e-6),
                native.qkv_heads(fused, None, None, (H, KH), positions, rope, *norms, 1e-6)):
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.is_contiguous()
            assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [False, True])
def test_glu_silu_against_float64(native, fused):
    g = torch.Generator().manual_seed(5)
    gate, up = torch.randn(4, 768, generator=g) * 6, torch.randn(4, 768, generator=g)
    gate[0, :6] = torch.tensor([-100.0, -87.5, -20.0, 20.0, 88.5, 100.0])       # past exp's clamps
    y = native.glu(torch.cat([gate, up], -1), None, "silu") if fused else native.glu(gate, up, "silu")
    g64, u64 = gate.double(), up.double()
    ref = g64 / (1 + torch.exp(-g64)) * u64
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=2e-6, atol=1e-6)


def test_glu_gelu_is_ggmls_table_bit_for_bit(native):
    g = torch.Generator().manual_seed(6)
    gate = torch.cat([torch.randn(3, 500, generator=g) * 4, torch.tensor([[-10.0, 10.0, -12.5, 11.0] * 3]).reshape(3, 4)], 1)
    up = torch.randn(3, 504, generator=g)
    assert torch.equal(native.glu(gate, up, "gelu_tanh"), gelu_tanh_like_ggml(gate) * up)


def test_exact_numerics_gelu_is_the_references(native):
    exact = NativeKernels(EXACT)
    gate, up = torch.randn(2, 64), torch.randn(2, 64)
    assert torch.equal(exact.glu(gate, up, "gelu_tanh"), TorchKernels(EXACT).glu(gate, up, "gelu_tanh"))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_K, Q.Q6_K])
def test_stacked_projections_give_each_weights_rows(native, qtype):
    """q | k | v stacked into one tiled weight: the same outputs as three matmuls; a part whose rows
    do not fill whole tiles (unless it is the last) or a second type is not stacked."""
    rng = np.random.default_rng(int(qtype))
    rows = [64, 32, 40]
    ws = [native.load(QWeight.from_numpy(random_quantized(qtype, r, 256, rng), qtype, r, 256, f"w{i}"))
          for i, r in enumerate(rows)]
    x = torch.randn(3, 256)
    fused = native.fuse_rows(ws)
    assert fused is not None and fused.n_rows == sum(rows)
    assert torch.equal(native.matmul(x, fused), torch.cat([native.matmul(x, w) for w in ws], -1))
    assert native.fuse_rows([ws[2], ws[0]]) is None                 # 40 rows then more: not whole tiles
    other = native.load(QWeight.from_numpy(random_quantized(Q.Q8_0, 32, 256, rng), Q.Q8_0, 32, 256, "w8"))
    assert native.fuse_rows([ws[0], other]) is None
    assert TorchKernels(LLAMACPP).fuse_rows(ws) is None

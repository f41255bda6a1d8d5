"""llama.cpp's numerics (the default): each rounding against an independent statement of what ggml does.
(The native kernels' integer dots against a transcription of ggml's: test_kernels.py.)

- Q8_0 activations against gguf-py's numpy Q8_0 quantize + dequantize (the same ggml reference).
- Q8_K activations against a numpy transcription of ggml's quantize_row_q8_K_ref (signed max,
  iscale = -127 / max, round to nearest, clip at 127).
- A sharded forward rounds as the unsharded one (row-parallel cuts fall on activation blocks, and
  the partial sums are float64 through the all-reduce).
- Exact mode leaves everything as float32; the KV cache follows the mode.
- Attention against a float64 numpy attention that rounds where ggml's graph does without flash
  attention: keys and values stored in f16, q rounded to f16 for q.k (scaled before the rounding
  where llama.cpp's graph scales q, in the softmax otherwise), the probabilities rounded to f16
  for p.v; read back from the cache over decode steps, and from a sliding window's ring.
- Rope angles against a numpy float32 transcription of ggml_rope_cache_init's recurrence
  (theta_i = theta_{i-1} * powf(base, -2/d), each product rounded to float32).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq

from synthetic import write_llama
from tensorsplit.kernels.choice import choose_kernels
from tensorsplit import kernels
from tensorsplit.model import make_plan, open_model
from tensorsplit.model.attention import Attention, KVCache
from tensorsplit.model.layers import no_reduce
from tensorsplit.kernels.numerics import EXACT, LLAMACPP, Numerics
from tensorsplit.kernels.base import MatmulInput
from tensorsplit.kernels.quants.activations import round_inputs
from tensorsplit.kernels.torch_kernels import TorchKernels, gelu_tanh_like_ggml
from tensorsplit.model.rope import Rope
from tensorsplit.model.transformer import RankModel
from test_model_parity import MIXED, ODD, world_logits


def _activations(rows=4, cols=512, seed=0):
    g = np.random.default_rng(seed)
    x = g.standard_normal((rows, cols)).astype(np.float32) * g.uniform(0.1, 1e4, (rows, 1)).astype(np.float32)
    x[0, :32] = 0.0   # an all-zero block: d = 0, values stay 0
    return x


def _q8_k_reference(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 256):
            blk = x[r, b:b + 256]
            mx = blk[np.argmax(np.abs(blk))]
            if mx == 0:
                out[r, b:b + 256] = 0
                continue
            iscale = np.float32(-127.0) / mx
            q = np.minimum(127, np.rint(iscale * blk))
            out[r, b:b + 256] = q * (np.float32(1.0) / iscale)
    return out


def test_exact_mode_leaves_inputs_alone():
    x = torch.from_numpy(_activations())
    for qt in (Q.Q4_0, Q.Q4_K, Q.F16):
        inp = MatmulInput(x)
        assert TorchKernels(EXACT).rounded(inp, qt) is inp.x2 and torch.equal(inp.x2, x)
        assert not torch.equal(TorchKernels(LLAMACPP).rounded(MatmulInput(x), qt), x)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.IQ4_NL])
def test_q8_0_inputs_match_gguf_py(qtype):
    x = _activations()
    expected = gq.dequantize(gq.quantize(x, Q.Q8_0), Q.Q8_0)
    got = round_inputs(torch.from_numpy(x), qtype).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    assert (got[0, :32] == 0).all()


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q4_K, Q.Q6_K, Q.IQ4_XS])
def test_q8_k_inputs_match_ggml_reference(qtype):
    x = _activations()
    got = round_inputs(torch.from_numpy(x), qtype).numpy()
    np.testing.assert_allclose(got, _q8_k_reference(x), rtol=1e-6, atol=0)
    assert not np.array_equal(got, x)


def test_float_weights_round_inputs_to_their_type():
    x = torch.from_numpy(_activations())
    assert torch.equal(round_inputs(x, Q.F16), x.half().float())
    assert torch.equal(round_inputs(x, Q.BF16), x.bfloat16().float())
    assert round_inputs(x, Q.F32) is x


def test_gelu_uses_the_f16_table():
    x = torch.tensor([-12.0, -3.3, 0.1234567, 2.71828, 11.0])
    y = gelu_tanh_like_ggml(x)
    assert TorchKernels(LLAMACPP).activation("gelu_tanh") is gelu_tanh_like_ggml
    assert y[0] == 0 and y[4] == 11.0
    assert torch.equal(y[1:4], torch.nn.functional.gelu(x[1:4].half().float(), approximate="tanh").half().float())


@pytest.mark.parametrize("types", [MIXED, ODD], ids=["mixed", "odd"])
def test_sharded_rounds_like_unsharded(tmp_path, types):
    """Ranks see the same activation blocks as one rank does, and the row-parallel partial sums are
    float64 through the all-reduce, rounded once (model/layers.py): 2, 3 and 4 ranks give the logits of
    one, bit for bit, while the mode itself moves them by far more. Before the partials were widened,
    the float32 summation order flipped 8-bit roundings now and then (up to 3.7% of the mode's own
    change). ODD's F32 ffn_down runs the torch path, a float64 BLAS product that sums K in an order
    that depends on the cut (test_model_parity.py): within 1e-6 of the mode's change there."""
    path = write_llama(tmp_path / "m.gguf", n_embd=512, n_heads=8, n_kv=2, n_ff=1024, vocab=300, types=types,
                       tied=False)
    gf, cfg = open_model(path)
    ids = list(range(1, 17))
    one = world_logits(gf, cfg, 1, ids, numerics=LLAMACPP)
    mode_change = np.abs(one - world_logits(gf, cfg, 1, ids, numerics=EXACT)).max()
    assert mode_change > 1e-3
    for world in (2, 3, 4):
        sharded = world_logits(gf, cfg, world, ids, numerics=LLAMACPP)
        if types is ODD:
            assert np.abs(sharded - one).max() <= 1e-6 * mode_change, world
        else:
            assert np.array_equal(sharded, one), (world, float(np.abs(sharded - one).max()))


def test_kv_cache_follows_the_mode(tmp_path):
    gf, cfg = open_model(write_llama(tmp_path / "m.gguf", n_embd=64, n_heads=2, n_kv=1, n_ff=64, vocab=64))
    for mode, dtype in [("exact", torch.float32), ("llamacpp", torch.float16)]:
        model = RankModel(cfg, make_plan(cfg, gf.tensors, 1).ranks[0], 1, no_reduce, gf, choose_kernels("cpu", Numerics(mode)))
        cache = model.allocate_cache(1, 8)
        assert cache.k.dtype == cache.v.dtype == dtype, mode


def _attention_like_ggml(q, k, v, scale, q_prescaled, window, sinks=None):
    """float64 numpy attention of one sequence from position 0, rounding where ggml does: q (n, H, hd),
    k and v (n, KV, hd) float32 -> (n, H, hd). sinks (H,): a logit per head in each softmax row's max
    and sum (ggml_soft_max_add_sinks)."""
    f16 = lambda a: a.astype(np.float16).astype(np.float64)  # noqa: E731
    n, H, _ = q.shape
    group = H // k.shape[1]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else True)
    out = np.empty(q.shape)
    for h in range(H):
        kh, vh = f16(k[:, h // group]), f16(v[:, h // group])       # the f16 cache
        if q_prescaled:                                              # Gemma, Phi-3: ggml_scale(q) first
            s = f16(q[:, h] * np.float32(scale)) @ kh.T
        else:                                                        # the others: soft_max_ext's scale
            s = (f16(q[:, h]) @ kh.T) * scale
        s = np.where(allowed, s, -np.inf)
        m = s.max(-1, keepdims=True) if sinks is None else np.maximum(s.max(-1, keepdims=True), sinks[h])
        p = np.exp(s - m)
        total = p.sum(-1, keepdims=True) + (0.0 if sinks is None else np.exp(sinks[h] - m))
        out[:, h] = f16(p / total) @ vh
    return out


ATTN_ATOL = 2e-6   # float32 against float64, outputs of magnitude ~1 (seen: 4.2e-7 where no probability flips)


def _rows_off(ours, ref) -> int:
    """(token, head) rows of the output farther than ATTN_ATOL from the reference. Our softmax is
    float32 (as ggml's is), the reference's float64: now and then a probability lies so close to an
    f16 rounding boundary that the two round it apart, which moves that row by one f16 step of the
    probability times v (up to ~2e-4 here)."""
    return int((np.abs(ours - ref).max(-1) > ATTN_ATOL).sum())


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("window", [0, 8], ids=["global", "ring"])
@pytest.mark.parametrize("q_prescaled", [False, True], ids=["scores-scaled", "q-prescaled"])
def test_attention_rounds_like_ggml(q_prescaled, window, native):
    """head_dim 128, so that the scale 1/sqrt(128) is not a power of two and the place of the scaling
    shows; q and k of magnitude ~3, so that rounding them to f16 moves scores. 16 tokens of prefill, then
    8 decode steps reading keys back from the cache (a ring of 8 for the sliding layer). The rounding
    matters: float32 attention differs from the reference by ~5e-3, the other scaling order by ~7e-3.
    Both the native op (one call per layer; the prefill through matrix products, decode steps key by
    key) and the torch path."""
    if native and not kernels.native():
        pytest.fail("the native kernels did not build")
    cpu = choose_kernels("cpu", LLAMACPP, native)
    assert cpu.name == ("native" if native else "torch")
    g = np.random.default_rng(5)
    n, H, KV, hd = 24, 4, 2, 128
    q = (g.standard_normal((n, H, hd)) * 3).astype(np.float32)
    k = (g.standard_normal((n, KV, hd)) * 3).astype(np.float32)
    v = g.standard_normal((n, KV, hd)).astype(np.float32)
    scale = 1 / np.sqrt(hd)
    attn = Attention((0, H), (0, KV), H // KV, hd, cpu, scale=scale, q_prescaled=q_prescaled)
    cache = KVCache(1, 1, 32, KV, hd, "cpu", torch.float16, windows=(window,))
    out = []
    for a, b in [(0, 16)] + [(p, p + 1) for p in range(16, n)]:
        pos = torch.arange(a, b)
        out.append(attn(*(torch.from_numpy(t[a:b]) for t in (q, k, v)), cache, 0, pos,
                        torch.zeros(b - a, dtype=torch.long)))
    ours = torch.cat(out).double().numpy().reshape(n, H, hd)
    ref = _attention_like_ggml(q, k, v, scale, q_prescaled, window)
    # of 96 rows; seen over seeds 0-7: at most 1 row off, by at most 3.3e-4
    assert _rows_off(ours, ref) <= 3 and np.abs(ours - ref).max() < 1e-3
    stored = cache.k_ring[0, 0] if window else cache.k[0, 0, :n]     # the ring holds the last 8 positions
    assert torch.equal(stored, torch.from_numpy(k[n - 8:] if window else k).half())
    assert _rows_off(_attention_like_ggml(q, k, v, scale, not q_prescaled, window), ref) > 48


@pytest.mark.parametrize("sinks", [False, True], ids=["plain", "sinks"])
@pytest.mark.parametrize("window", [0, 600], ids=["global", "ring"])
def test_decode_attention_at_depth_splits_positions_across_threads(window, sinks):
    """Decode steps at 700-707 positions: the native op splits each head's positions into chunks of 256
    that the threads share, merges their softmax in chunk order, and serves every q head of a KV head
    (4 per group here) from one read of each key. Against the float64 reference (llama.cpp's roundings;
    with sinks as gpt-oss has them, and a ring of 600 that spans the chunks), and bit for bit the same
    at 1 and 2 threads."""
    if not kernels.native():
        pytest.fail("the native kernels did not build")
    g = np.random.default_rng(11)
    n, H, KV, hd, n_prefill = 708, 8, 2, 64, 700
    q = (g.standard_normal((n, H, hd)) * 2).astype(np.float32)
    k = (g.standard_normal((n, KV, hd)) * 2).astype(np.float32)
    v = g.standard_normal((n, KV, hd)).astype(np.float32)
    sink = (g.standard_normal(H) * 3).astype(np.float32) if sinks else None
    scale = 1 / np.sqrt(hd)
    ref = _attention_like_ggml(q, k, v, scale, False, window, None if sink is None else sink.astype(np.float64))
    runs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            cpu = choose_kernels("cpu", LLAMACPP)
            attn = Attention((0, H), (0, KV), H // KV, hd, cpu, scale=scale)
            cache = KVCache(1, 1, 1024, KV, hd, "cpu", torch.float16, windows=(window,))
            extra = () if sink is None else (torch.from_numpy(sink),)
            attn(*(torch.from_numpy(x[:n_prefill]) for x in (q, k, v)), cache, 0, torch.arange(n_prefill),
                 torch.zeros(n_prefill, dtype=torch.long), *extra)
            steps = [attn(*(torch.from_numpy(x[p:p + 1]) for x in (q, k, v)), cache, 0, torch.tensor([p]),
                          torch.zeros(1, dtype=torch.long), *extra) for p in range(n_prefill, n)]
            runs.append(torch.cat(steps).double().numpy().reshape(n - n_prefill, H, hd))
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(runs[0], runs[1])
    # of 64 rows: a probability that rounds to the other f16 neighbour moves a row by one f16 step of it
    assert _rows_off(runs[0], ref[n_prefill:]) <= 3 and np.abs(runs[0] - ref[n_prefill:]).max() < 1e-3


@pytest.mark.parametrize("base,dims,freq_scale,factors", [
    (10000.0, 64, 1.0, False), (1e6, 128, 0.25, False), (500000.0, 128, 1.0, True), (10000.0, 24, 1.0, False)])
def test_rope_angles_are_ggml_float32_recurrence(base, dims, freq_scale, factors):
    """cos and sin against the correctly rounded cos/sin of the angles ggml_rope_cache_init forms:
    theta = p, then theta *= powf(base, -2.0f / d) per pair, each angle freq_scale * (theta / factor)
    in float32 (llama3-style rope_freqs factors, or linear scaling). Up to position 131071, where
    float32 angles differ from float64 ones by ~1e-2 rad, so exact mode misses by ~1e-3."""
    positions = np.array([0, 1, 7, 511, 4095, 32767, 131071])
    ff = np.linspace(1.0, 8.0, dims // 2).astype(np.float32) if factors else np.ones(dims // 2, np.float32)
    theta_scale = np.float32(base) ** (np.float32(-2.0) / np.float32(dims))
    theta = positions.astype(np.float32)
    angles = np.empty((len(positions), dims // 2), np.float32)
    for i in range(dims // 2):
        angles[:, i] = np.float32(freq_scale) * (theta / ff[i])
        theta = theta * theta_scale
    got = {}
    for mode in ("llamacpp", "exact"):
        rope = Rope(dims, dims, base, neox=True, freq_scale=freq_scale,
                    freq_factors=torch.from_numpy(ff) if factors else None)
        rope.build(int(positions.max()) + 1, TorchKernels(Numerics(mode)))     # the tables, built once per context
        got[mode] = np.stack([rope.cos[positions].double().numpy(), rope.sin[positions].double().numpy()])
    ref = np.stack([np.cos(angles.astype(np.float64)), np.sin(angles.astype(np.float64))])
    np.testing.assert_allclose(got["llamacpp"], ref, atol=1.5e-7, rtol=0)    # seen: 3.5e-8 (0.6 ulp)
    assert np.abs(got["exact"] - ref).max() > 1e-4

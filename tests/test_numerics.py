"""--numerics llamacpp: each rounding against an independent statement of what ggml does.

- Q8_0 activations against gguf-py's numpy Q8_0 quantize + dequantize (the same ggml reference).
- Q8_K activations against a numpy transcription of ggml's quantize_row_q8_K_ref (signed max,
  iscale = -127 / max, round to nearest, clip at 127).
- A sharded forward rounds as the unsharded one (row-parallel cuts fall on activation blocks).
- Exact mode leaves everything as float32; the KV cache follows the mode.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq

from synthetic import write_llama
from tensorsplit.model import numerics, open_model
from tensorsplit.model.quants.activations import round_inputs
from test_model_parity import MIXED, ODD, world_logits


@pytest.fixture
def llamacpp():
    numerics.set_numerics("llamacpp")
    yield
    numerics.set_numerics("exact")


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
        assert round_inputs(x, qt) is x


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.IQ4_NL])
def test_q8_0_inputs_match_gguf_py(llamacpp, qtype):
    x = _activations()
    expected = gq.dequantize(gq.quantize(x, Q.Q8_0), Q.Q8_0)
    got = round_inputs(torch.from_numpy(x), qtype).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    assert (got[0, :32] == 0).all()


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q4_K, Q.Q6_K, Q.IQ4_XS])
def test_q8_k_inputs_match_ggml_reference(llamacpp, qtype):
    x = _activations()
    got = round_inputs(torch.from_numpy(x), qtype).numpy()
    np.testing.assert_allclose(got, _q8_k_reference(x), rtol=1e-6, atol=0)
    assert not np.array_equal(got, x)


def test_float_weights_round_inputs_to_their_type(llamacpp):
    x = torch.from_numpy(_activations())
    assert torch.equal(round_inputs(x, Q.F16), x.half().float())
    assert torch.equal(round_inputs(x, Q.BF16), x.bfloat16().float())
    assert round_inputs(x, Q.F32) is x


def test_gelu_uses_the_f16_table(llamacpp):
    x = torch.tensor([-12.0, -3.3, 0.1234567, 2.71828, 11.0])
    y = numerics.gelu_tanh(x)
    assert y[0] == 0 and y[4] == 11.0
    assert torch.equal(y[1:4], torch.nn.functional.gelu(x[1:4].half().float(), approximate="tanh").half().float())


@pytest.mark.parametrize("types", [MIXED, ODD], ids=["mixed", "odd"])
def test_sharded_rounds_like_unsharded(tmp_path, llamacpp, types):
    """Ranks see the same activation blocks as one rank does, so sharding changes only the order of
    float32 partial sums; now and then that flips one 8-bit rounding, which moves logits by a
    little. Seen, as a share of what the mode itself changes: <= 0.13% (mixed types, 4 ranks, one
    flip) and 3.7% (odd: F16/BF16/F32 inputs, no blocks). A block cut between ranks would move
    them by as much as the mode does."""
    path = write_llama(tmp_path / "m.gguf", n_embd=512, n_heads=8, n_kv=2, n_ff=1024, vocab=300, types=types,
                       tied=False)
    gf, cfg = open_model(path)
    ids = list(range(1, 17))
    one = world_logits(gf, cfg, 1, ids)
    numerics.set_numerics("exact")
    mode_change = np.abs(one - world_logits(gf, cfg, 1, ids)).max()
    numerics.set_numerics("llamacpp")
    for world in (2, 3, 4):
        sharded = world_logits(gf, cfg, world, ids)
        assert np.abs(sharded - one).max() < 0.1 * mode_change, world
        assert (sharded.argmax(-1) == one.argmax(-1)).all(), world

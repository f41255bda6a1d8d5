"""The model core against independent references, all ranks of a world built in one process.

- Sharded vs unsharded: the ranks' vocabulary slices concatenated equal the one-rank logits
  (the row-parallel partial sums are float64 through the all-reduce, so the ranks' split of a
  sum does not show).
- Against tests/reference.py, a float64 dense forward over gguf-py-dequantized weights with
  HF-style rope: top-1 equal wherever the reference's top two logits differ by more than 1e-2,
  and logits within an absolute tolerance (float32 accumulation).
Each tolerance is about four times the largest error seen (torch 2.13 CPU, 2 cores), with that
figure beside it: SmolLM2's logits reach 33; the random-weight synthetic models differ by
orders of magnitude between the K-quant one (a residual stream large enough that logits reach
52) and the others (logits of ~3).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from reference import DenseLlama
from synthetic import write_llama, write_model
from tensorsplit.kernels.choice import choose_kernels
from tensorsplit.comm.local import ThreadWorld
from tensorsplit.model import make_plan, open_model, parse_split
from tensorsplit.model.attention import Attention
from tensorsplit.model.layers import no_reduce
from tensorsplit.kernels.numerics import EXACT, LLAMACPP
from tensorsplit.model.transformer import RankModel

DECODE_ATOL = 2.5e-4          # decode steps and batched slots vs one prefill (seen: 5.5e-5; the prompt
                              # attends through matrix products, a decode step key by key)
REF_ATOL = {                  # one rank vs the float64 reference (exact numerics)
    "smollm2": 2e-4,          # seen: 5.2e-5
    "mixed": 6e-3,            # seen: 1.7e-3 (K-quant and IQ4 random weights, logits up to 52)
    "odd": 8e-6,              # seen: 1.8e-6
    "llama3": 6e-6,           # seen: 1.3e-6
    "linear": 6e-6,           # seen: 1.3e-6
}
# Sharded vs one rank: the row-parallel partials are float64 to the all-reduce and rounded once, so with
# quantized and half weights (the native kernels) the logits are one rank's bit for bit, and the tests
# assert equality. "odd" has an F32 ffn_down, which no native kernel takes: the torch path's float64
# BLAS product sums K in an order that depends on the cut, and one float32 value was seen an ulp
# (6e-8) away, so it keeps a tolerance.
ODD_SHARD_ATOL = 1e-6


def assert_same_logits(ours, one, name="", atol=0.0):
    if atol:
        np.testing.assert_allclose(ours, one, atol=atol, rtol=0)
    else:
        assert np.array_equal(ours, one), (name, float(np.abs(ours - one).max()))
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 2, 77, 88, 99, 1040, 12, 640]


def world_logits(gf, cfg, world, ids, split=None, numerics=EXACT):
    """Run one forward of `ids` (one sequence from position 0) on every rank; concatenated logits."""
    plan = make_plan(cfg, gf.tensors, world, parse_split(split, world))
    tw = ThreadWorld(world)
    ids = torch.tensor(ids)
    n = len(ids)

    def rank(r):
        m = RankModel(cfg, plan.ranks[r], world, tw.reducer(r) if world > 1 else no_reduce, gf, choose_kernels("cpu", numerics))
        m.allocate_cache(1, 64)
        return m.forward(ids, torch.arange(n), torch.zeros(n, dtype=torch.long))

    parts = tw.run(rank)
    assert [p.shape[1] for p in parts] == [r.local_vocab for r in plan.ranks]
    return torch.cat(parts, dim=-1).double().numpy()


def assert_matches_reference(ours, ref, atol):
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 1e-2
    assert decisive.sum() >= len(ref) // 2, "too few decisive positions for a meaningful test"
    assert (ours.argmax(-1)[decisive] == ref.argmax(-1)[decisive]).all()
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return open_model(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_one_rank(smollm2):
    return world_logits(*smollm2, 1, PROMPT)


def test_smollm2_matches_dense_reference(smollm2_path, smollm2_one_rank):
    ref = DenseLlama(smollm2_path).logits(PROMPT)
    assert_matches_reference(smollm2_one_rank, ref, REF_ATOL["smollm2"])


# 1,1,1,3: the last rank holds q heads 5..8, a part of KV group 1 and all of group 2, so its attention
# copies KV heads per q head instead of reading them in place (attention.py's gqa_in_place)
@pytest.mark.parametrize("world,split", [(2, None), (3, None), (4, None), (2, "3,1"), (4, "1,1,1,3")])
def test_smollm2_sharded_equals_unsharded(smollm2, smollm2_one_rank, world, split):
    gf, cfg = smollm2
    ranks = make_plan(cfg, gf.tensors, world, parse_split(split, world)).ranks
    in_place = [Attention(r.q_heads, r.kv_heads, cfg.group_size, cfg.head_dim,
                          choose_kernels("cpu", EXACT)).gqa_in_place for r in ranks]
    assert in_place == ([True] * 3 + [False] if split == "1,1,1,3" else [True] * world)
    ours = world_logits(*smollm2, world, PROMPT, split)
    assert_same_logits(ours, smollm2_one_rank, f"{world} {split}")


def test_smollm2_rank_bytes_halve(smollm2):
    gf, cfg = smollm2
    one = make_plan(cfg, gf.tensors, 1).ranks[0].nbytes
    two = [r.nbytes for r in make_plan(cfg, gf.tensors, 2).ranks]
    # only norms are mirrored; the tied embedding is vocabulary-parallel
    assert sum(two) - one < 0.01 * one
    assert all(0.4 * one < b < 0.6 * one for b in two)


MIXED = {"token_embd": Q.Q8_0, "output": Q.Q6_K, "attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K,
         "attn_output": Q.IQ4_NL, "ffn_gate": Q.Q2_K, "ffn_up": Q.Q3_K, "ffn_down": Q.IQ4_XS}
ODD = {"token_embd": Q.Q4_0, "attn_q": Q.Q4_1, "attn_k": Q.Q5_0, "attn_v": Q.Q5_1,
       "attn_output": Q.Q8_0, "ffn_gate": Q.BF16, "ffn_up": Q.F16, "ffn_down": Q.F32}


@pytest.fixture(scope="module", params=["mixed", "odd"])
def synthetic(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / f"{request.param}.gguf"
    if request.param == "mixed":   # K-quants and IQ4 types; untied output; 8 heads / 2 KV heads
        write_llama(path, n_embd=256, n_heads=8, n_kv=2, n_ff=768, vocab=300, types=MIXED, tied=False)
    else:                          # 9 heads / 3 KV heads as SmolLM2, legacy and float types, tied
        write_llama(path, n_embd=288, n_heads=9, n_kv=3, n_ff=320, vocab=301, types=ODD, seed=1)
    return path, open_model(path)


def test_synthetic_matches_reference_and_shards(synthetic):
    path, (gf, cfg) = synthetic
    name = path.stem
    ids = [5, 17, 290, 3, 3, 44, 120, 7, 251, 60, 9, 0]
    one = world_logits(gf, cfg, 1, ids)
    assert_matches_reference(one, DenseLlama(path).logits(ids), REF_ATOL[name])
    for world, split in [(2, None), (3, None), (2, "1,3")]:
        assert_same_logits(world_logits(gf, cfg, world, ids, split), one, f"{name} {world} {split}",
                           ODD_SHARD_ATOL if name == "odd" else 0.0)


def test_decode_and_batching_match_prefill(smollm2):
    """Token-by-token decode over the KV cache, and two sequences sharing a forward in different
    slots, give the logits of one prefill of each sequence."""
    gf, cfg = smollm2
    plan = make_plan(cfg, gf.tensors, 1)
    m = RankModel(cfg, plan.ranks[0], 1, no_reduce, gf, choose_kernels("cpu", EXACT))
    m.allocate_cache(2, 64)
    a, b = torch.tensor(PROMPT[:9]), torch.tensor(PROMPT[5:])
    full_a = m.forward(a, torch.arange(9), torch.zeros(9, dtype=torch.long))
    full_b = m.forward(b, torch.arange(len(b)), torch.ones(len(b), dtype=torch.long))
    # prefill 4 tokens of each into fresh slots in one mixed batch, then decode a one token at a time
    # while b continues in the same steps
    m.allocate_cache(2, 64)
    ids = torch.cat([a[:4], b[:4]])
    pos = torch.cat([torch.arange(4), torch.arange(4)])
    slots = torch.tensor([0] * 4 + [1] * 4)
    out = m.forward(ids, pos, slots)
    torch.testing.assert_close(out[:4], full_a[:4], atol=DECODE_ATOL, rtol=0)
    torch.testing.assert_close(out[4:], full_b[:4], atol=DECODE_ATOL, rtol=0)
    for p in range(4, 9):
        step = m.forward(torch.tensor([a[p], b[p]]), torch.tensor([p, p]), torch.tensor([0, 1]))
        torch.testing.assert_close(step[0], full_a[p], atol=DECODE_ATOL, rtol=0)
        torch.testing.assert_close(step[1], full_b[p], atol=DECODE_ATOL, rtol=0)


def test_logit_rows_select_positions(smollm2, smollm2_one_rank):
    gf, cfg = smollm2
    m = RankModel(cfg, make_plan(cfg, gf.tensors, 1).ranks[0], 1, no_reduce, gf, choose_kernels("cpu", EXACT))
    m.allocate_cache(1, 64)
    n = len(PROMPT)
    last = m.forward(torch.tensor(PROMPT), torch.arange(n), torch.zeros(n, dtype=torch.long), torch.tensor([n - 1]))
    assert_same_logits(last.double().numpy()[0], smollm2_one_rank[-1], "last row alone")


@pytest.mark.parametrize("scaling", ["llama3", "linear"])
def test_rope_scaling_matches_reference(tmp_path, scaling):
    """llama3-style scaling (the converter's rope_freqs tensor divides each frequency) and linear
    scaling (positions divided by rope.scaling.factor), against the dense reference."""
    from gguf import GGUFValueType
    from synthetic import write_model
    path = tmp_path / f"{scaling}.gguf"
    hd = 32
    if scaling == "llama3":
        factors = np.linspace(1.0, 8.0, hd // 2).astype(np.float32)
        write_model(path, n_embd=256, n_heads=8, n_kv=2, n_ff=256, vocab=300, rope_base=500000.0,
                    extra_tensors={"rope_freqs.weight": factors})
    else:
        write_model(path, n_embd=256, n_heads=8, n_kv=2, n_ff=256, vocab=300,
                    extra_kv={"llama.rope.scaling.type": ("linear", GGUFValueType.STRING),
                              "llama.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32)})
    gf, cfg = open_model(path)
    assert cfg.has_rope_freqs == (scaling == "llama3")
    ids = [5, 17, 290, 3, 3, 44, 120, 7, 251, 60, 9, 0, 33, 34]
    one = world_logits(gf, cfg, 1, ids)
    assert_matches_reference(one, DenseLlama(path).logits(ids), REF_ATOL[scaling])
    assert_same_logits(world_logits(gf, cfg, 2, ids), one, scaling)


def test_resident_bytes_match_info_and_stay_within_5_percent(tmp_path):
    """What `info` reports before loading (loader.resident_bytes) is what a rank holds once loaded, in the
    tiled layout, and at most 5% above its shard's file bytes (the K-quants widen their 6-bit scales)."""
    from tensorsplit.kernels import native
    from tensorsplit.model.loader import resident_bytes
    path = write_llama(tmp_path / "k.gguf", n_embd=512, n_heads=8, n_kv=2, n_ff=1024, vocab=300, tied=False,
                       types={"token_embd": Q.Q8_0, "output": Q.Q6_K, "attn_q": Q.Q4_K, "attn_k": Q.Q5_K,
                              "attn_v": Q.Q3_K, "attn_output": Q.Q4_0, "ffn_gate": Q.Q2_K, "ffn_up": Q.IQ4_XS,
                              "ffn_down": Q.Q6_K})
    gf, cfg = open_model(path)
    for world in (1, 2):
        for shard in make_plan(cfg, gf.tensors, world).ranks:
            m = RankModel(cfg, shard, world, no_reduce, gf, choose_kernels("cpu", EXACT))
            assert m.weight_bytes == resident_bytes(gf, shard.tensors, native())
            assert shard.nbytes <= m.weight_bytes <= 1.05 * shard.nbytes, (m.weight_bytes, shard.nbytes)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
def test_a_mixture_of_experts_rank_holds_its_share_of_the_experts(tmp_path, arch):
    """A mixture of experts' rank, once loaded, holds what `info` reports and at most 5% above its shard's
    file bytes, the experts included: every expert's rows of gate/up and columns of down, quantized
    (no dequantized expert), about 1 / world of each at 1, 2 and 4 ranks and at --split 3,1."""
    from tensorsplit.kernels import native
    from tensorsplit.model.loader import resident_bytes
    path = write_model(tmp_path / "moe.gguf", arch, n_embd=256, n_heads=4, n_kv=2, n_ff=512, vocab=300,
                       n_expert=8, n_expert_used=2, n_ff_exp=512, n_ff_shexp=512 if arch == "qwen2moe" else None,
                       types={"ffn_gate_exps": Q.Q4_K, "ffn_up_exps": Q.Q4_K, "ffn_down_exps": Q.Q6_K})
    gf, cfg = open_model(path)
    expert_bytes = sum(t.nbytes for name, t in gf.tensors.items() if name.endswith("_exps.weight"))
    for world, ratios in ((1, None), (2, None), (4, None), (2, (3, 1))):
        plan = make_plan(cfg, gf.tensors, world, ratios) if ratios else make_plan(cfg, gf.tensors, world)
        for r, shard in enumerate(plan.ranks):
            m = RankModel(cfg, shard, world, no_reduce, gf, choose_kernels("cpu", LLAMACPP))
            assert m.weight_bytes == resident_bytes(gf, shard.tensors, native())
            assert shard.nbytes <= m.weight_bytes <= 1.05 * shard.nbytes, (world, r, m.weight_bytes, shard.nbytes)
            share = (ratios[r] / sum(ratios)) if ratios else 1 / world
            held = sum(t.nbytes for t in shard.tensors if t.split.startswith("exp_"))
            assert abs(held - share * expert_bytes) <= 0.05 * expert_bytes, (world, r, held, expert_bytes)

"""Qwen2, Qwen3, Phi-3, Gemma 3 and the mixtures of experts (Qwen3-MoE, Qwen2-MoE, Mixtral) against
independent dense references, all ranks in one process.
(The same families, and llama3 / linear rope scaling, against llama.cpp itself: test_arch_goldens.py.)

- Synthetic files (tests/synthetic.py writes them as llama.cpp's converter lays each arch out):
  the one-rank forward equals tests/reference_archs.py, a float64 numpy forward of the
  published architecture (HF rotate_half rope, biases, q/k norms, fused splits, sliding
  window, LongRoPE): top-1 equal wherever the reference's top two differ by more than 1e-2,
  logits within an absolute tolerance per arch (float32 accumulation). Sharded (2, 3 and, where
  the FFN's blocks allow, 4 ranks, and an uneven split) equals unsharded bit for bit (the row-parallel partials are float64 to the
  all-reduce and rounded once).
- Gemma 3 270M (the real Q4_K_M file): one rank vs the dense reference on a 12-token prompt,
  same top-1 rule, and 2 and 4 ranks vs one rank.
Each tolerance is about four times the largest error seen (torch 2.13 CPU, 2 cores), with that
figure beside it. qwen2's random K-quant weights and biases make logits of ~50, the other
synthetic models' are ~3, so their errors differ by two orders of magnitude.
- Unknown architectures and tensors are refused, naming them and what is supported.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

from reference_archs import DenseModel
from synthetic import write_model
from tensorsplit.kernels.choice import choose_kernels
from tensorsplit.comm.local import ThreadWorld
from tensorsplit.errors import ConfigError, UnsupportedError
from tensorsplit.model import make_plan, open_model, parse_split
from tensorsplit.model.arch import ARCHS
from tensorsplit.model.attention import KVCache
from tensorsplit.model.config import config_from_gguf
from tensorsplit.model.layers import no_reduce
from tensorsplit.kernels.numerics import EXACT
from tensorsplit.model.transformer import RankModel

REF_ATOL = {                  # one rank vs the float64 reference (exact numerics)
    "qwen2": 1e-3,            # seen: 2.5e-4 (logits up to 53)
    "qwen3": 2e-5,            # seen: 4.7e-6
    "phi3": 8e-6,             # seen: 2.0e-6 (also at 2 ranks with either set of LongRoPE factors)
    "phi3-separate-qkv": 6e-6,   # seen: 1.3e-6
    "gemma3": 8e-6,           # seen: 1.9e-6; the ring test (ring vs one forward): 1.4e-6
    "qwen3moe": 1e-5,         # seen: 2.5e-6
    "qwen2moe": 4e-6,         # seen: 8.1e-7
    "llama-moe": 7e-6,        # seen: 1.6e-6
    "qwen3moe-3-blocks": 1e-5,   # seen: 1.8e-6
    "gpt-oss": 4e-6,          # seen: 8.3e-7 (without YaRN the reference itself moves by 0.70)
}
# Sharded vs one rank: the same logits bit for bit (row-parallel partials are float64 to the all-reduce
# and rounded once; README), asserted as equality.
RING_ATOL = 1e-5              # the ring test: prompts fed in chunks vs whole (seen: 0)
GEMMA_REF_ATOL = 7e-5         # Gemma 3 270M vs the reference, logits up to 24 (seen: 1.6e-5)
IDS = [5, 17, 290, 3, 3, 44, 120, 7, 251, 60, 9, 0]
# "<bos>The capital of France is Paris. The capital of" in Gemma 3's vocabulary
GEMMA_PROMPT = [2, 818, 5279, 529, 7001, 563, 9079, 236761, 669, 5279, 529, 9405]

SYNTHETIC = {
    # 8 heads / 2 KV heads (replicated at 3 ranks); K-quants where the plan allows; untied output
    "qwen2": dict(n_embd=256, n_heads=8, n_kv=2, n_ff=768, vocab=300, tied=False,
                  types={"output": Q.Q6_K, "attn_q": Q.Q5_0, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K,
                         "ffn_gate": Q.Q4_K, "ffn_up": Q.Q5_K, "ffn_down": Q.Q6_K}),
    # head_dim 128 != n_embd / n_heads, as Qwen3 declares it
    "qwen3": dict(n_embd=256, n_heads=4, n_kv=2, head_dim=128, n_ff=768, vocab=300, seed=1,
                  types={"attn_output": Q.Q4_0, "ffn_down": Q.Q5_K}),
    # fused qkv with GQA (6 heads / 2 KV heads), partial rotary (24 of 32 dims), LongRoPE factors
    "phi3": dict(n_embd=192, n_heads=6, n_kv=2, n_ff=512, vocab=300, rope_dim=24, rope_factors=True,
                 original_context=48, seed=2, types={"attn_qkv": Q.Q5_0, "ffn_up": Q.Q5_1}),
    # phi3 as some converters write it: q, k and v in separate tensors (ffn_up still fused)
    "phi3-separate-qkv": dict(n_embd=192, n_heads=6, n_kv=2, n_ff=512, vocab=300, seed=4, fused_qkv=False,
                              types={"attn_q": Q.Q4_0, "attn_k": Q.Q5_0, "ffn_up": Q.IQ4_NL}),
    # 6 layers: 5 sliding (window 4 < 12 tokens) then one global; 4 heads / 1 KV head
    "gemma3": dict(n_layers=6, n_embd=128, n_heads=4, n_kv=1, head_dim=64, n_ff=256, vocab=300, window=4,
                   rope_base=1e6, seed=3),
    # mixtures of experts, every expert split by rows / columns: 32 experts top-8 (K-quant gate rows),
    # 16 top-4 with a shared expert and q/k/v biases, and Mixtral's llama with 8 top-2
    "qwen3moe": dict(n_embd=256, n_heads=4, n_kv=2, head_dim=64, n_ff=512, vocab=300, seed=5, n_expert=32,
                     n_expert_used=8, n_ff_exp=256,
                     types={"ffn_gate_exps": Q.Q4_K, "ffn_up_exps": Q.Q5_0, "ffn_down_exps": Q.Q8_0}),
    "qwen2moe": dict(n_embd=256, n_heads=8, n_kv=2, n_ff=512, vocab=300, seed=6, n_expert=16, n_expert_used=4,
                     n_ff_exp=128, n_ff_shexp=384,
                     types={"ffn_gate_exps": Q.Q4_0, "ffn_down_exps": Q.Q4_1, "ffn_down_shexp": Q.Q5_0}),
    "llama-moe": dict(n_embd=256, n_heads=4, n_kv=2, n_ff=256, vocab=300, seed=7, n_expert=8, n_expert_used=2,
                      types={"ffn_gate_exps": Q.Q6_K, "ffn_up_exps": Q.IQ4_NL, "ffn_down_exps": Q.Q8_0}),
    # Qwen3-30B-A3B's expert width in K-quants: 768 = 3 blocks of 256, shared out per expert in a rotated
    # order (2 ranks: 2 + 1 and 1 + 2 blocks; 4 ranks: each expert on 3 of them)
    "qwen3moe-3-blocks": dict(n_embd=256, n_heads=4, n_kv=2, head_dim=64, n_ff=512, vocab=300, seed=8, n_expert=8,
                              n_expert_used=4, n_ff_exp=768,
                              types={"ffn_gate_exps": Q.Q4_K, "ffn_up_exps": Q.Q4_K, "ffn_down_exps": Q.Q6_K}),
    # gpt-oss: sinks, biases, layer 0 sliding (window 4 < 12 tokens), YaRN, 16 MXFP4 experts top 4 by logit
    "gpt-oss": dict(n_embd=256, n_heads=8, n_kv=2, head_dim=64, n_ff=256, vocab=300, seed=9, n_expert=16,
                    n_expert_used=4, n_ff_exp=256, window=4, bias_scale=0.3, rope_base=150000.0,
                    extra_kv={"gpt-oss.rope.scaling.type": ("yarn", V.STRING),
                              "gpt-oss.rope.scaling.factor": (32.0, V.FLOAT32),
                              "gpt-oss.rope.scaling.original_context_length": (4096, V.UINT32)},
                    types={"ffn_gate_exps": Q.MXFP4, "ffn_up_exps": Q.MXFP4, "ffn_down_exps": Q.MXFP4}),
}


def world_logits(gf, cfg, world, ids, split=None, n_ctx=64):
    """One forward of `ids` (one sequence from position 0) on every rank; concatenated logits."""
    plan = make_plan(cfg, gf.tensors, world, parse_split(split, world))
    tw = ThreadWorld(world)
    n = len(ids)

    def rank(r):
        m = RankModel(cfg, plan.ranks[r], world, tw.reducer(r) if world > 1 else no_reduce, gf, choose_kernels("cpu", EXACT))
        m.allocate_cache(1, n_ctx)
        return m.forward(torch.tensor(ids), torch.arange(n), torch.zeros(n, dtype=torch.long))

    return torch.cat(tw.run(rank), dim=-1).double().numpy()


def assert_matches_reference(ours, ref, atol):
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 1e-2
    assert decisive.sum() >= len(ref) // 2, "too few decisive positions for a meaningful test"
    assert (ours.argmax(-1)[decisive] == ref.argmax(-1)[decisive]).all()
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)


@pytest.fixture(scope="module", params=list(SYNTHETIC))
def synthetic(request, tmp_path_factory):
    arch = request.param if request.param in ARCHS else request.param.split("-")[0]   # "phi3-separate-qkv": phi3
    path = write_model(tmp_path_factory.mktemp("arch") / f"{request.param}.gguf", arch, **SYNTHETIC[request.param])
    return path, open_model(path)


def test_synthetic_matches_reference_and_shards(synthetic):
    path, (gf, cfg) = synthetic
    one = world_logits(gf, cfg, 1, IDS)
    assert_matches_reference(one, DenseModel(path).logits(IDS, n_ctx=64), REF_ATOL[path.stem])
    # qwen2's and qwen3's FFN is 3 blocks of 256 (K-quants): 4 ranks are refused there, as they must be
    four = [(4, None)] if path.stem not in ("qwen2", "qwen3") else []
    for world, split in [(2, None), (3, None), (2, "1,3")] + four:
        sharded = world_logits(gf, cfg, world, IDS, split)
        assert np.array_equal(sharded, one), (path.stem, world, split, float(np.abs(sharded - one).max()))


def test_phi3_longrope_factors_follow_the_context(tmp_path):
    """Short factors while the context fits the original 48 positions, long ones past it."""
    path = write_model(tmp_path / "phi3.gguf", "phi3", **SYNTHETIC["phi3"])
    gf, cfg = open_model(path)
    ref = DenseModel(path)
    short, long = (world_logits(gf, cfg, 2, IDS, n_ctx=n) for n in (32, 64))
    assert_matches_reference(short, ref.logits(IDS, n_ctx=32), REF_ATOL["phi3"])
    assert_matches_reference(long, ref.logits(IDS, n_ctx=64), REF_ATOL["phi3"])
    assert np.abs(short - long).max() > 0.1      # the choice matters


def test_fused_tensors_split_per_segment(tmp_path):
    """A rank's attn_qkv rows are its q heads, then its KV heads' k rows, then their v rows; its ffn_up
    rows its FFN range in the gate half, then in the up half. Over the ranks every row is held once."""
    gf, cfg = open_model(write_model(tmp_path / "phi3.gguf", "phi3", **SYNTHETIC["phi3"]))
    assert cfg.spec.fused_qkv and cfg.spec.fused_gate_up
    hd, q, kv, ff = cfg.head_dim, cfg.q_dim, cfg.kv_dim, cfg.n_ff
    plan = make_plan(cfg, gf.tensors, 2)
    for r in plan.ranks:
        (q0, q1), (k0, k1), (f0, f1) = r.q_heads, r.kv_heads, r.ffn
        assert r.slice_of("blk.0.attn_qkv.weight").ranges == (
            (q0 * hd, q1 * hd), (q + k0 * hd, q + k1 * hd), (q + kv + k0 * hd, q + kv + k1 * hd))
        assert r.slice_of("blk.0.ffn_up.weight").ranges == ((f0, f1), (ff + f0, ff + f1))
    for name in ("blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"):
        rows = sorted(i for r in plan.ranks for a, b in r.slice_of(name).ranges for i in range(a, b))
        assert rows == list(range(gf.tensors[name].shape[1]))
        assert sum(r.slice_of(name).nbytes for r in plan.ranks) == gf.tensors[name].nbytes


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    return open_model(gemma3_path)


@pytest.fixture(scope="module")
def gemma3_one_rank(gemma3):
    return world_logits(*gemma3, 1, GEMMA_PROMPT)


def test_gemma3_270m_config(gemma3):
    _, cfg = gemma3
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.swa_window) == (18, 4, 1, 256, 512)
    assert [i for i in range(18) if not cfg.is_swa(i)] == [5, 11, 17]
    assert (cfg.rope_base, cfg.rope_base_swa, cfg.attn_scale) == (1e6, 1e4, 1 / 16)


def test_gemma3_270m_matches_dense_reference(gemma3_path, gemma3_one_rank):
    ref = DenseModel(gemma3_path).logits(GEMMA_PROMPT)
    assert_matches_reference(gemma3_one_rank, ref, GEMMA_REF_ATOL)


@pytest.mark.parametrize("world", [2, 4])
def test_gemma3_270m_sharded_equals_unsharded(gemma3, gemma3_one_rank, world):
    sharded = world_logits(*gemma3, world, GEMMA_PROMPT)
    assert np.array_equal(sharded, gemma3_one_rank), float(np.abs(sharded - gemma3_one_rank).max())


def test_unknown_architecture_lists_supported(tmp_path):
    path = write_model(tmp_path / "m.gguf", "mamba")
    with pytest.raises(UnsupportedError, match="architecture 'mamba'") as e:
        open_model(path)
    assert f"supported: {', '.join(sorted(ARCHS))}" in str(e.value)
    assert set(ARCHS) == {"llama", "qwen2", "qwen3", "phi3", "gemma3", "qwen3moe", "qwen2moe", "gpt-oss"}


def test_unknown_tensor_is_named_with_the_supported_ones(tmp_path):
    # Qwen3 has no q bias: a file with one is refused, not silently half-used
    path = write_model(tmp_path / "m.gguf", "qwen3", extra_tensors={"blk.0.attn_q.bias": np.zeros(256)})
    with pytest.raises(UnsupportedError, match=r"qwen3 architecture does not use: blk\.0\.attn_q\.bias; "
                                               r"supported: .*attn_q_norm\.weight"):
        open_model(path)


def test_phi3_file_shapes_are_checked(tmp_path):
    path = write_model(tmp_path / "half.gguf", "phi3", extra_tensors={"rope_factors_long.weight": np.ones(16)})
    with pytest.raises(ConfigError, match="come as a pair; the file has only rope_factors_long"):
        open_model(path)
    # separate q/k/v with a separate ffn_gate (a llama file's metadata relabelled phi3): phi3's ffn_up is
    # always [gate; up], so the file's ffn_up has half the rows phi3 needs
    gf, _ = open_model(write_model(tmp_path / "split.gguf", "llama"))
    kv = {k.replace("llama.", "phi3."): v for k, v in gf.kv.items()} | {"general.architecture": "phi3"}
    with pytest.raises(ConfigError, match="ffn_up.weight"):
        config_from_gguf(kv, gf.tensors)


def test_sliding_window_ring_equals_one_forward(tmp_path):
    """Local layers keep only `window` positions in a ring. Feeding two sequences in interleaved steps
    of mixed sizes (single tokens, chunks longer than the window), so that every ring wraps, gives the
    logits of one forward over each whole sequence (which test_synthetic_matches_reference checks
    against the dense reference), at 1 and 2 ranks."""
    path = write_model(tmp_path / "g.gguf", "gemma3", **SYNTHETIC["gemma3"])   # window 4
    gf, cfg = open_model(path)
    seqs = [list(range(3, 23)), list(range(40, 54))]                 # 20 and 14 tokens
    whole = [world_logits(gf, cfg, 1, s) for s in seqs]
    steps = [[(0, 3), (1, 1)], [(0, 1), (1, 6)], [(0, 7), (1, 1)], [(0, 1)], [(0, 1), (1, 6)], [(0, 7)]]
    for world in (1, 2):
        plan = make_plan(cfg, gf.tensors, world)
        tw = ThreadWorld(world)

        def rank(r):
            m = RankModel(cfg, plan.ranks[r], world, tw.reducer(r) if world > 1 else no_reduce, gf, choose_kernels("cpu", EXACT))
            cache = m.allocate_cache(2, 32)
            assert cache.k_ring.shape[2] == 4 and cache.k.shape[0] == 1   # 5 local layers in rings, 1 global
            assert cache.nbytes == KVCache.planned_bytes([4] * 5 + [0], 2, 32, plan.ranks[r].n_local_kv_heads,
                                                         cfg.head_dim) == 2 * (5 * 4 + 32) * 2 * 1 * 64 * 4
            done, got = [0, 0], [[], []]
            for step in steps:
                ids, pos, slots = [], [], []
                for s, n in step:
                    ids += seqs[s][done[s]:done[s] + n]
                    pos += range(done[s], done[s] + n)
                    slots += [s] * n
                    done[s] += n
                out = m.forward(torch.tensor(ids), torch.tensor(pos), torch.tensor(slots))
                for s in (0, 1):
                    got[s].append(out[torch.tensor(slots) == s])
            assert done == [len(s) for s in seqs]
            return [torch.cat(g) for g in got]

        per_rank = tw.run(rank)
        for s in (0, 1):
            logits = torch.cat([per_rank[r][s] for r in range(world)], dim=-1).double().numpy()
            np.testing.assert_allclose(logits, whole[s], atol=RING_ATOL, rtol=0)

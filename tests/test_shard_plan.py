"""Shard-plan properties: every row and column owned exactly once (or replicated where the plan
says so), cuts on quant-block boundaries, ratios respected, impossible plans refused clearly."""
from __future__ import annotations

import itertools
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from tensorsplit.errors import ShardPlanError
from tensorsplit.model.arch import arch_spec
from tensorsplit.model.config import ModelConfig, RopeScaling, expected_shapes
from tensorsplit.model.shard_plan import apportion, make_plan, parse_split


def make_cfg(n_heads=9, n_kv=3, head_dim=64, n_embd=576, n_ff=1536, vocab=49152, n_layers=2, tied=True,
             arch="llama"):
    return ModelConfig(arch, n_layers, n_embd, n_ff, n_heads, n_kv, head_dim, 10000.0, head_dim,
                       RopeScaling(), 1e-5, 2048, vocab, tied, False, spec=arch_spec(arch))


def tensor_table(cfg, types=None):
    """name -> TensorInfo-like (shape, qtype, nbytes) for every tensor of cfg."""
    types = types or {}
    out = {}
    for name, shape in expected_shapes(cfg).items():
        suffix = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        qtype = Q.F32 if len(shape) == 1 else types.get(suffix, Q.Q4_0)
        block, size = GGML_QUANT_SIZES[qtype]
        out[name] = SimpleNamespace(shape=shape, qtype=qtype, nbytes=math.prod(shape) // block * size)
    return out


def check_plan(cfg, tensors, plan):
    world, g = plan.world, cfg.group_size
    # query heads: a partition of 0..n_heads in rank order
    assert [r.q_heads for r in plan.ranks] == list(zip([0] + [r.q_heads[1] for r in plan.ranks[:-1]],
                                                      [r.q_heads[1] for r in plan.ranks]))
    assert plan.ranks[0].q_heads[0] == 0 and plan.ranks[-1].q_heads[1] == cfg.n_heads
    for r in plan.ranks:
        assert r.n_local_heads >= 1 and r.local_ff >= 1 and r.local_vocab >= 1
        # KV heads: exactly the ones this rank's query heads read
        assert r.kv_heads == (r.q_heads[0] // g, (r.q_heads[1] - 1) // g + 1)
    kv_owned = [h for r in plan.ranks for h in range(*r.kv_heads)]
    if plan.kv_replicated:
        assert set(kv_owned) == set(range(cfg.n_kv_heads))
    else:
        assert sorted(kv_owned) == list(range(cfg.n_kv_heads))   # each KV head exactly once
    for attr, total in (("ffn", cfg.n_ff), ("vocab", cfg.vocab_size)):
        ranges = [getattr(r, attr) for r in plan.ranks]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # every tensor: row/col slices partition their axis (or are exactly the whole, for replicated KV),
    # input-axis cuts fall on block boundaries, bytes add up; a fused tensor's runs included
    for name, info in tensors.items():
        slices = [r.slice_of(name) for r in plan.ranks]
        if slices[0].axis is None:
            assert all(s.ranges == ((0, info.shape[-1]),) and s.nbytes == info.nbytes for s in slices)
            continue
        axis_len = info.shape[0] if len(info.shape) == 1 or slices[0].axis == 0 else info.shape[1]
        if slices[0].axis == 0 and len(info.shape) == 2:
            block = GGML_QUANT_SIZES[info.qtype][0]
            assert all(s.start % block == 0 and s.end % block == 0 for s in slices), name
        held = [i for s in slices for a, b in s.ranges for i in range(a, b)]
        assert sorted(set(held)) == list(range(axis_len)), name
        if not (plan.kv_replicated and slices[0].split in ("kv_rows", "qkv_rows")):
            assert len(held) == axis_len, name       # each row or column exactly once
            assert sum(s.nbytes for s in slices) == info.nbytes, name


@pytest.mark.parametrize("heads", [(9, 3), (8, 8), (8, 2), (4, 1), (32, 8), (15, 5), (6, 3)])
@pytest.mark.parametrize("world", range(1, 9))
def test_even_plans(heads, world):
    n_heads, n_kv = heads
    cfg = make_cfg(n_heads=n_heads, n_kv=n_kv, head_dim=32, n_embd=n_heads * 32, n_ff=32 * 40, vocab=1000)
    tensors = tensor_table(cfg)
    if world > n_heads:
        with pytest.raises(ShardPlanError, match="query heads"):
            make_plan(cfg, tensors, world)
        return
    plan = make_plan(cfg, tensors, world)
    check_plan(cfg, tensors, plan)
    assert plan.kv_replicated == (world > n_kv)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "gemma3"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_other_architectures(arch, world):
    # 8 heads / 2 KV heads: KV heads split at 2 ranks, replicated at 3 and 4; phi3 cuts its fused
    # attn_qkv and ffn_up per segment
    cfg = make_cfg(n_heads=8, n_kv=2, head_dim=32, n_embd=256, n_ff=32 * 24, vocab=1000, arch=arch)
    tensors = tensor_table(cfg, {"ffn_down": Q.Q8_0, "attn_qkv": Q.Q5_0})
    plan = make_plan(cfg, tensors, world)
    check_plan(cfg, tensors, plan)
    assert plan.kv_replicated == (world > 2)


@pytest.mark.parametrize("split", ["3,1", "1,3", "1,1,2", "5,1,1,1", "1,2,3,4,5", "1,1,1,1,1,1,1,10"])
def test_uneven_plans(split):
    world = len(split.split(","))
    cfg = make_cfg()
    tensors = tensor_table(cfg)
    ratios = parse_split(split, world)
    plan = make_plan(cfg, tensors, world, ratios)
    check_plan(cfg, tensors, plan)
    # FFN and vocab follow the ratios within one unit
    for r, share in zip(plan.ranks, ratios):
        assert abs(r.local_ff / plan.ffn_unit - share * cfg.n_ff / plan.ffn_unit) < 1 + 1e-9 or r.local_ff == plan.ffn_unit
        assert abs(r.local_vocab - share * cfg.vocab_size) < 1 + 1e-9


def test_smollm2_shapes_on_2_and_4_ranks():
    cfg = make_cfg()  # SmolLM2: 9 heads, 3 KV heads
    tensors = tensor_table(cfg, {"attn_q": Q.Q4_1, "attn_output": Q.Q4_1, "ffn_down": Q.Q4_1, "token_embd": Q.Q8_0})
    two = make_plan(cfg, tensors, 2)
    assert [r.q_heads for r in two.ranks] == [(0, 6), (6, 9)] and not two.kv_replicated
    four = make_plan(cfg, tensors, 4)
    assert four.kv_replicated and [r.n_local_heads for r in four.ranks] == [3, 2, 2, 2]
    check_plan(cfg, tensors, four)
    one = make_plan(cfg, tensors, 1)
    # at 2 ranks each holds about half of one rank's bytes (only norms are mirrored)
    assert all(0.4 < r.nbytes / one.ranks[0].nbytes < 0.6 for r in two.ranks)


def test_k_quant_blocks_make_coarser_units():
    # head_dim 64 with a Q4_K attn_output (256-element blocks): cuts every 4 heads
    cfg = make_cfg(n_heads=8, n_kv=8, head_dim=64, n_embd=512, n_ff=1024)
    tensors = tensor_table(cfg, {"attn_output": Q.Q4_K, "ffn_down": Q.Q6_K, "attn_q": Q.Q4_K,
                                 "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q4_K})
    plan = make_plan(cfg, tensors, 2)
    assert plan.head_unit == 4 and plan.ffn_unit == 256
    check_plan(cfg, tensors, plan)
    with pytest.raises(ShardPlanError, match=r"units of 4: head_dim 64 and attn_output's 256-element quant blocks"):
        make_plan(cfg, tensors, 3)
    with pytest.raises(ShardPlanError, match="FFN"):
        make_plan(replace(cfg, n_ff=512), {**tensors, **tensor_table(replace(cfg, n_ff=512), {"ffn_down": Q.Q6_K})}, 3)


@pytest.mark.parametrize("text,world,match", [
    ("3,1,1", 2, "has 3 shares but the world has 2"),
    ("3,x", 2, "expected comma-separated numbers"),
    ("3,0", 2, "positive"),
    ("3,-1", 2, "positive"),
    ("nan,1", 2, "positive"),
])
def test_bad_split_flags(text, world, match):
    with pytest.raises(ShardPlanError, match=match):
        parse_split(text, world)


def test_apportion_exhaustive_small():
    for n in range(1, 13):
        for world in range(1, n + 1):
            for weights in itertools.product([1, 2, 3, 7], repeat=min(world, 3)):
                weights = (list(weights) * world)[:world]
                ratios = [w / sum(weights) for w in weights]
                bounds = apportion(n, ratios, "x")
                counts = [b - a for a, b in bounds]
                assert sum(counts) == n and min(counts) >= 1
                assert bounds[0][0] == 0 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
                # within one unit of the ideal share, plus what ranks forced up to one unit took
                forced = sum(max(0.0, 1 - r * n) for r in ratios)
                for c, r in zip(counts, ratios):
                    assert c == 1 or abs(c - r * n) < 1 + forced + 1e-9


def test_world_zero_refused():
    with pytest.raises(ShardPlanError):
        make_plan(make_cfg(), tensor_table(make_cfg()), 0)

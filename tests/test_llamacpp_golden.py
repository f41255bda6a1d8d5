"""tensorsplit against llama.cpp's own outputs (fixtures written by scripts/make_golden.py).

llama.cpp rounds as it computes: activations to 8 bits inside its quantized matmuls, attention
through an f16 cache with f16 probabilities, GELU through an f16 table. Our default numerics,
"llamacpp" (kernels/numerics.py), round in the same places, with the same integer block dots (the
native kernels); "exact" keeps float32. Measured over 2,040 scored tokens of English at n_ctx 512
(8 chunks) against llama.cpp 0.3.36's 14.974 (Gemma 3) and 18.388 (SmolLM2):
  llamacpp: Gemma 3 270M 14.960 (-0.09%) at 1, 2 and 4 ranks, top-1 94.7%; SmolLM2 18.382
            (-0.03%), top-1 95.8%. Gemma's top-1 agreement is rounding noise at this size: with
            the K-quants' group scales applied in float per group instead of in integers per
            super-block (llama.cpp's way, and ours now) it was 95.9% (ppl 14.971), and exact
            numerics give 95.7%. So its bound is 94%, not 95%.
  exact:    Gemma 3 270M 14.893 (-0.54%), lower than llama.cpp in all 8 chunks: llama.cpp's
            roundings cost it accuracy, and Gemma's residual stream (~1e4) makes them large.
            SmolLM2 18.342 (-0.25%), top-1 96.8%.
So: top-1 agreement >= 95% (Gemma 3 in llama.cpp's numerics: 94%); perplexity within 0.5% with llama.cpp's
numerics. (Exact numerics over a whole text, measured as above, is not run in CI: its reference is the
float64 model, test_archs.py.)
Gemma 3 at n_ctx 2048 (perplexity_long: 2 chunks, 2,046 scored tokens), where its 15 sliding-window
layers (window 512) mask most of each chunk: llama.cpp 16.449; ours 16.384 (-0.40%) at 1 and 2 ranks,
top-1 94.9%; exact 16.305 (-0.88%: the bias above, larger over 4x the context). Bounds 0.75% and
>= 94% (only 2 chunks, so noisier than at 512). Without the window (every layer global) perplexity
is 554 and top-1 10%.
Every fixture records the sha256 of the model file llama.cpp read; a different file on disk fails
the tests (and so does a missing fixture).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import FIXTURES
from golden_models import sha256
from tensorsplit.kernels.choice import choose_kernels
from tensorsplit.comm import BackendChoice, CommGroup
from tensorsplit.comm.local import ThreadWorld
from tensorsplit.coordinator.perplexity import perplexity
from tensorsplit.coordinator.tokenizer import Tokenizer
from tensorsplit.model import make_plan, open_model
from tensorsplit.model.layers import no_reduce
from tensorsplit.kernels.numerics import Numerics
from tensorsplit.model.transformer import RankModel
from tensorsplit.worker.engine import Engine, LoadedRank

GOLDEN = {"smollm2": FIXTURES / "smollm2_golden.json", "gemma3": FIXTURES / "gemma3-270m_golden.json"}
KV_GOLDEN = {"smollm2": FIXTURES / "smollm2_kv_golden.json", "gemma3": FIXTURES / "gemma3-270m_kv_golden.json"}
PPL_TOLERANCE = {("smollm2", "llamacpp"): 0.005, ("gemma3", "llamacpp"): 0.005}
PPL_TOLERANCE_LONG, TOP1_LONG = 0.0075, 0.94     # Gemma 3 at n_ctx 2048 (module docstring)
# Top-1 agreement at n_ctx 512: 95% but for Gemma 3 under llama.cpp's numerics, where it moves with
# the order of float steps that llama.cpp does not fix either (module docstring): 94%
TOP1 = {("gemma3", "llamacpp"): 0.94}
# -ctk/-ctv against llama.cpp with the same cache (KV_GOLDEN), measured over the 8 chunks: q8_0 SmolLM2 18.461
# vs 18.415 (+0.25%), top-1 95.4%; Gemma 3 14.927 vs 14.915 (+0.08%), 94.9%. q4_0: 19.421 vs 19.667 (-1.25%),
# 84.3%; 16.999 vs 16.725 (+1.65%), 79.9%. A 4-bit cache is noise that two roundings of nearly equal values
# draw apart: llama.cpp's own q4_0 run agrees with its f16 one (flash attention both) at 85.6% and 81.1%
# top-1, its q8_0 run at 95.7% and 94.6%. Before the Walsh-Hadamard rotation that llama.cpp applies to a
# quantized cache, q4_0 was +13.5% and 72% here.
ROPE_GOLDEN = {"smollm2": FIXTURES / "smollm2_rope_golden.json"}
# YaRN from an original context of 128 (a heavy stretch: perplexity 43 against the file's own 18) was -0.99%
# off llama.cpp's when written; our angle tables equal a float32 transcription of ggml's rope_yarn to 6e-8,
# so the gap is elsewhere (not found yet). Linear scaling with another base and attention factor: +0.07%.
ROPE_TOLERANCE = {"yarn": 0.015, "linear": 0.005}
KV_PPL_TOLERANCE = {"q8_0": 0.005, "q4_0": 0.025}
KV_TOP1 = {"q8_0": 0.94, "q4_0": 0.75}
MAX_OFFSET = {"smollm2": 1.5, "gemma3": 4.0}     # test_prompt_top_logits_match_llamacpp


def golden(name, model_path, fixtures=None):
    """The fixture of model `name` (of GOLDEN, or of `fixtures`), checked to be made from the file at
    `model_path`."""
    path = (fixtures or GOLDEN)[name]
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/make_golden.py")
    g = json.loads(path.read_text())
    assert sha256(model_path) == g["model_sha256"], f"{model_path} is not the file {path.name} was made from"
    return g


def local_engine(gf, cfg, n_ctx, numerics: Numerics, kv_types=None):
    """A world of one in this process: the same Engine the coordinator drives in a real run."""
    plan = make_plan(cfg, gf.tensors, 1)
    model = RankModel(cfg, plan.ranks[0], 1, no_reduce, gf, choose_kernels("cpu", numerics))
    model.allocate_cache(1, n_ctx, kv_types=kv_types)
    comm = CommGroup(0, 1, 0, torch.device("cpu"), BackendChoice("gloo", False, "one rank"))
    return Engine(LoadedRank(model, comm, [cfg.vocab_size]), 1, n_ctx)


def world_forward(gf, cfg, world, n_ctx, numerics: Numerics, kv_types=None):
    """A world of `world` ranks as threads in this process: forward(ids, positions, slots, rows) ->
    full logits, the Engine's signature."""
    plan = make_plan(cfg, gf.tensors, world)
    tw = ThreadWorld(world)
    models = [RankModel(cfg, plan.ranks[r], world, tw.reducer(r), gf, choose_kernels("cpu", numerics)) for r in range(world)]
    for m in models:
        m.allocate_cache(1, n_ctx, kv_types=kv_types)

    def forward(ids, positions, slots, rows):
        return torch.cat(tw.run(lambda r: models[r].forward(ids, positions, slots, rows)), dim=-1)
    return forward


@pytest.fixture(scope="module", params=list(GOLDEN))
def model(request):
    """(name, gf, cfg, path) for each model with a golden fixture."""
    name = request.param
    path = request.getfixturevalue(f"{name}_path")
    return (name, *open_model(path), path)


_RUNS: dict = {}   # (name, world, numerics, fixture key) -> (PerplexityResult, top-1 agreement, fixture run)


def run_perplexity(request, name, world, mode, key="perplexity", chunks=None, cache=None):
    """Our perplexity and top-1 agreement on fixture `key`'s run (its first `chunks` chunks, or all), and
    llama.cpp's perplexity over the same chunks, computed once per session (the rank-agreement test
    reuses the runs that the llama.cpp tests made). cache: a KV cache type, for both k and v, against
    the <model>_kv_golden.json fixture's run of that name."""
    if (name, world, mode, key, chunks, cache) not in _RUNS:
        path = request.getfixturevalue(f"{name}_path")
        g = golden(name, path, KV_GOLDEN if cache else GOLDEN)
        g = g["runs"][cache] if cache else g[key]
        gf, cfg = open_model(path)
        tok = Tokenizer.from_gguf_kv(gf.kv)
        tokens = tok.encode((FIXTURES / g["text_file"]).read_text(), add_special=True)
        assert len(tokens) == g["n_tokens"]
        kv_types = (cache, cache) if cache else None
        forward = (local_engine(gf, cfg, g["n_ctx"], Numerics(mode), kv_types).forward if world == 1
                   else world_forward(gf, cfg, world, g["n_ctx"], Numerics(mode), kv_types))
        res = perplexity(forward, tokens, g["n_ctx"], tok.bos_id if tok.add_bos else None, max_chunks=chunks)
        theirs_chunks = g["chunks"][:chunks]
        assert len(res.chunk_nll) == len(theirs_chunks) == (chunks or g["n_chunks"])
        ours = [t for chunk in res.argmax for t in chunk]
        theirs = [t for chunk in theirs_chunks for t in chunk["argmax"]]
        their_ppl = math.exp(sum(c["nll_sum"] for c in theirs_chunks) / sum(c["count"] for c in theirs_chunks))
        if chunks is None:
            assert abs(their_ppl / g["ppl"] - 1) < 1e-9, (their_ppl, g["ppl"])
        _RUNS[name, world, mode, key, chunks, cache] = (res, sum(a == b for a, b in zip(ours, theirs)) / len(theirs),
                                                        g, their_ppl)
    return _RUNS[name, world, mode, key, chunks, cache]


@pytest.mark.slow
# Exact numerics is checked against the float64 reference instead (test_archs.py, test_model_parity.py),
# and against llama.cpp's top logits on prompts below: a whole text in exact numerics cost CI 70 s per
# model for a bound of 0.5-0.75% against llama.cpp, which does not compute in exact numerics.
# Sharded runs give one rank's logits bit for bit (test_model_parity, test_archs, test_numerics assert
# it on prompts, in both numerics, up to 4 ranks): one sharded run here, Gemma 3 at 2 ranks in the
# default numerics, checks the same over a whole text (test_gemma3_perplexity_same_at_1_and_2_ranks,
# against one rank on the first chunks).
@pytest.mark.parametrize("name,world,mode,key,chunks", [
    ("smollm2", 1, "llamacpp", "perplexity", None),
    ("gemma3", 2, "llamacpp", "perplexity", None), ("gemma3", 1, "llamacpp", "perplexity_long", None),
])
def test_perplexity_and_top1_match_llamacpp(request, name, world, mode, key, chunks):
    res, agree, g, their_ppl = run_perplexity(request, name, world, mode, key, chunks)
    print(f"{name} n_ctx {g['n_ctx']} world {world} {mode} chunks {chunks or g['n_chunks']}: tensorsplit ppl "
          f"{res.ppl:.4f} vs llama.cpp {their_ppl:.4f} ({res.ppl / their_ppl - 1:+.2%}); top-1 agreement {agree:.2%}")
    if key == "perplexity_long":
        assert agree >= TOP1_LONG and abs(res.ppl / their_ppl - 1) < PPL_TOLERANCE_LONG
    else:
        assert agree >= TOP1.get((name, mode), 0.95) and abs(res.ppl / their_ppl - 1) < PPL_TOLERANCE[name, mode]


@pytest.mark.slow
def test_gemma3_perplexity_same_at_1_and_2_ranks(request):
    """Sharding splits the row-parallel sums, whose partials are float64 through the all-reduce and
    rounded once (model/layers.py), so 2 ranks compute what 1 does over a whole text: the same
    per-chunk log-likelihoods and argmax, bit for bit, in llama.cpp's numerics (one rank on the first
    2 of the 8 chunks). Before the partials were widened, llama.cpp's 8-bit rounding magnified the
    float32 summation order on Gemma's residual stream (~1e4) into argmax changes at 4.5-4.9% of
    positions."""
    one, _, g, _ = run_perplexity(request, "gemma3", 1, "llamacpp", "perplexity", 2)
    two, _, _, _ = run_perplexity(request, "gemma3", 2, "llamacpp", "perplexity")
    print(f"gemma3 n_ctx {g['n_ctx']} llamacpp, first 2 chunks: nll {one.chunk_nll} at 1 rank, {two.chunk_nll[:2]} at 2")
    assert one.chunk_nll == two.chunk_nll[:2] and one.argmax == two.argmax[:2]


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["q8_0", "q4_0"])
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_quantized_cache_perplexity_matches_llamacpp(request, name, cache):
    """-ctk T -ctv T against llama.cpp's perplexity with the same cache (KV_GOLDEN; with flash attention,
    which llama.cpp needs for a quantized V cache, and which rounds differently from our attention: its
    f16 cache with flash attention is itself off its f16 cache without, by KV_FA_SHIFT), over the whole
    text at 1 rank; 2 ranks give the same bits on the first 2 chunks."""
    res, agree, g, their_ppl = run_perplexity(request, name, 1, "llamacpp", cache=cache)
    print(f"{name} -ctk/-ctv {cache}: tensorsplit ppl {res.ppl:.4f} vs llama.cpp {their_ppl:.4f} "
          f"({res.ppl / their_ppl - 1:+.2%}); top-1 agreement {agree:.2%}")
    two, _, _, _ = run_perplexity(request, name, 2, "llamacpp", chunks=2, cache=cache)
    assert two.chunk_nll == res.chunk_nll[:2] and two.argmax == res.argmax[:2]
    assert abs(res.ppl / their_ppl - 1) < KV_PPL_TOLERANCE[cache] and agree >= KV_TOP1[cache], (res.ppl, their_ppl, agree)


@pytest.mark.parametrize("mode", ["llamacpp", "exact"])
@pytest.mark.parametrize("world", [1, 2])
def test_prompt_top_logits_match_llamacpp(model, world, mode):
    """At every position of each prompt: llama.cpp's top-1 is our top-1 wherever llama.cpp's own top two
    differ by more than 0.5 (its 8-bit activations move logits by ~0.1 on SmolLM2), and our logits for
    its top-10 tokens, less their common offset (softmax ignores it), are within 1.0 of its values.
    The offset itself stays within MAX_OFFSET (seen, exact / llamacpp: SmolLM2 0.97 / 1.13, so 1.5;
    Gemma 3 3.1 / 2.1, so 4.0, at the chat prompt's token after <start_of_turn>, where the top logit
    is -12 and a residual stream of ~1e4 shifts all logits alike)."""
    name, gf, cfg, path = model
    max_offset = MAX_OFFSET[name]
    prompts = golden(name, path)["top_logits"]["prompts"]
    plan = make_plan(cfg, gf.tensors, world)
    tw = ThreadWorld(world)

    def rank(r):
        m = RankModel(cfg, plan.ranks[r], world, tw.reducer(r) if world > 1 else no_reduce, gf, choose_kernels("cpu", Numerics(mode)))
        m.allocate_cache(1, 128)
        outs = []
        for p in prompts:
            n = len(p["ids"])
            outs.append(m.forward(torch.tensor(p["ids"]), torch.arange(n), torch.zeros(n, dtype=torch.long)))
        return outs

    per_rank = tw.run(rank)
    checked, worst = 0, 0.0
    for i, p in enumerate(prompts):
        logits = torch.cat([per_rank[r][i] for r in range(world)], dim=-1)
        for pos, top in enumerate(p["top"]):
            ids = [t[0] for t in top]
            vals = torch.tensor([t[1] for t in top])
            diff = logits[pos, ids] - vals
            worst = max(worst, float(diff.abs().max()))
            assert (diff - diff.mean()).abs().max() < 1.0, (p["name"], pos)
            assert diff.abs().max() < max_offset, (p["name"], pos)
            if vals[0] - vals[1] > 0.5:
                assert int(logits[pos].argmax()) == ids[0], (p["name"], pos)
                checked += 1
    print(f"{name} world {world} {mode}: largest offset {worst:.3f}, {checked} top-1 checks")
    assert checked >= 10


@pytest.mark.slow
@pytest.mark.parametrize("run", ["yarn", "linear"])
def test_rope_flags_match_llamacpp(smollm2_path, run):
    """--rope-scaling, --rope-scale / --rope-freq-scale, --rope-freq-base and the --yarn-* flags over SmolLM2's
    file (scripts/make_golden.py ROPE_RUNS: YaRN from an original context of 128 with a half ramp and moved
    correction dims; linear with another base and --yarn-attn-factor), end to end through `perplexity` on 2
    workers, against llama.cpp's perplexity with the same context parameters. The flags show: the file's own
    rope gives a perplexity far from either."""
    from cli_helpers import run_cli
    g = golden("smollm2", smollm2_path, ROPE_GOLDEN)["runs"][run]
    r = run_cli("perplexity", str(smollm2_path), "-f", str(FIXTURES / g["text_file"]), "-c", str(g["n_ctx"]),
                "--chunks", str(g["n_chunks"]), "--json", "--nproc-per-node", "2", *g["flags"])
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)["ppl"]
    plain = golden("smollm2", smollm2_path)["perplexity"]["chunks"][:g["n_chunks"]]
    plain_ppl = math.exp(sum(c["nll_sum"] for c in plain) / sum(c["count"] for c in plain))
    print(f"smollm2 {' '.join(g['flags'])}: tensorsplit ppl {ours:.4f} vs llama.cpp {g['ppl']:.4f} "
          f"({ours / g['ppl'] - 1:+.2%}); the file's own rope: {plain_ppl:.4f}")
    assert abs(ours / g["ppl"] - 1) < ROPE_TOLERANCE[run], (ours, g["ppl"])
    assert abs(plain_ppl / g["ppl"] - 1) > 10 * ROPE_TOLERANCE[run], (plain_ppl, g["ppl"])

"""tensorsplit against llama.cpp's own outputs (fixtures written by scripts/make_golden.py).

llama.cpp rounds as it computes: activations to 8 bits inside its quantized matmuls, attention
through an f16 cache with f16 probabilities, GELU through an f16 table. Exact float32 arithmetic
(our default) therefore does not reproduce it token for token; `--numerics llamacpp`
(model/numerics.py) rounds in the same places. Measured over 2,040 scored tokens of English at
n_ctx 512 (8 chunks) against llama.cpp 0.3.36's 14.974 (Gemma 3) and 18.388 (SmolLM2):
  exact:    Gemma 3 270M 14.893 (-0.54%), lower than llama.cpp in all 8 chunks: llama.cpp's
            roundings cost it accuracy, and Gemma's residual stream (~1e4) makes them large.
            SmolLM2 18.342 (-0.25%).
  llamacpp: Gemma 3 270M 14.953 (-0.14%) at 1 and 2 ranks, 14.967 (-0.05%) at 4; top-1 95.1-95.3%.
            The chunks now scatter on both sides of llama.cpp's (-1.0% .. +0.9%): the bias is
            gone and rounding noise remains. That noise is chaotic at this size: the same
            arithmetic batched differently (one 512-token forward instead of the engine's
            steps) gives 14.933. SmolLM2: 18.430 (+0.23%), no closer than exact.
So: top-1 agreement >= 95% everywhere; perplexity within 0.5% with llama.cpp's numerics, and
with exact numerics within 0.5% (SmolLM2) / 0.75% (Gemma 3, for the bias above).
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import FIXTURES
from tensorsplit.comm import BackendChoice, CommGroup
from tensorsplit.comm.local import ThreadWorld
from tensorsplit.coordinator.perplexity import perplexity
from tensorsplit.coordinator.tokenizer import Tokenizer
from tensorsplit.model import make_plan, open_model
from tensorsplit.model.layers import no_reduce
from tensorsplit.model.numerics import set_numerics
from tensorsplit.model.transformer import RankModel
from tensorsplit.worker.engine import Engine, Shard

GOLDEN = {"smollm2": FIXTURES / "smollm2_golden.json", "gemma3": FIXTURES / "gemma3-270m_golden.json"}
PPL_TOLERANCE = {("smollm2", "exact"): 0.005, ("gemma3", "exact"): 0.0075,
                 ("smollm2", "llamacpp"): 0.005, ("gemma3", "llamacpp"): 0.005}


def golden(name):
    path = GOLDEN[name]
    if not path.exists():
        pytest.skip(f"{path} is absent: run scripts/make_golden.py")
    return json.loads(path.read_text())


def local_engine(gf, cfg, n_ctx):
    """A world of one in this process: the same Engine the coordinator drives in a real run."""
    plan = make_plan(cfg, gf.tensors, 1)
    model = RankModel(cfg, plan.ranks[0], 1, no_reduce, gf)
    model.allocate_cache(1, n_ctx)
    comm = CommGroup(0, 1, 0, torch.device("cpu"), BackendChoice("gloo", False, "one rank"))
    return Engine(Shard(model, comm, [cfg.vocab_size]), 1, n_ctx)


def world_forward(gf, cfg, world, n_ctx):
    """A world of `world` ranks as threads in this process: forward(ids, positions, slots, rows) ->
    full logits, the Engine's signature."""
    plan = make_plan(cfg, gf.tensors, world)
    tw = ThreadWorld(world)
    models = [RankModel(cfg, plan.ranks[r], world, tw.reducer(r), gf) for r in range(world)]
    for m in models:
        m.allocate_cache(1, n_ctx)

    def forward(ids, positions, slots, rows):
        return torch.cat(tw.run(lambda r: models[r].forward(ids, positions, slots, rows)), dim=-1)
    return forward


@pytest.fixture(scope="module", params=list(GOLDEN))
def model(request):
    """(name, gf, cfg) for each model with a golden fixture."""
    name = request.param
    return (name, *open_model(request.getfixturevalue(f"{name}_path")))


@pytest.fixture
def numerics(request):
    """Set the process's numerics (model/numerics.py) for one test, and restore the default after."""
    set_numerics(request.param)
    yield request.param
    set_numerics("exact")


@pytest.mark.slow
# SmolLM2 at 2 ranks is left to test_model_parity (sharded == unsharded) and test_e2e
@pytest.mark.parametrize("name,world,numerics", [
    ("smollm2", 1, "exact"), ("gemma3", 1, "exact"),
    ("gemma3", 1, "llamacpp"), ("gemma3", 2, "llamacpp"), ("gemma3", 4, "llamacpp"),
], indirect=["numerics"])
def test_perplexity_and_top1_match_llamacpp(request, name, world, numerics):
    gf, cfg = open_model(request.getfixturevalue(f"{name}_path"))
    g = golden(name)["perplexity"]
    tok = Tokenizer.from_gguf_kv(gf.kv)
    tokens = tok.encode((FIXTURES / g["text_file"]).read_text(), add_special=True)
    assert len(tokens) == g["n_tokens"]
    forward = local_engine(gf, cfg, g["n_ctx"]).forward if world == 1 else world_forward(gf, cfg, world, g["n_ctx"])
    res = perplexity(forward, tokens, g["n_ctx"], tok.bos_id if tok.add_bos else None)
    assert len(res.chunk_nll) == g["n_chunks"]
    ours = [t for chunk in res.argmax for t in chunk]
    theirs = [t for chunk in g["chunks"] for t in chunk["argmax"]]
    agree = sum(a == b for a, b in zip(ours, theirs)) / len(theirs)
    print(f"{name} world {world} {numerics}: tensorsplit ppl {res.ppl:.4f} vs llama.cpp {g['ppl']:.4f} "
          f"({res.ppl / g['ppl'] - 1:+.2%}); top-1 agreement {agree:.2%}")
    assert agree >= 0.95
    assert abs(res.ppl / g["ppl"] - 1) < PPL_TOLERANCE[name, numerics]


@pytest.mark.parametrize("world", [1, 2])
def test_prompt_top_logits_match_llamacpp(model, world):
    """At every position of each prompt: llama.cpp's top-1 is our top-1 wherever llama.cpp's own top two
    differ by more than 0.5 (its 8-bit activations move logits by ~0.1 on SmolLM2), and our logits for
    its top-10 tokens, less their common offset (softmax ignores it), are within 1.0 of its values.
    The offset itself stays within 1.0 on SmolLM2; on Gemma 3 within 4.0 (seen: 2.9, at the chat
    prompt's token after <start_of_turn>, where the top logit is -12: the 8-bit rounding of a
    residual stream of ~1e4 shifts all logits alike there; emulating that rounding halves it)."""
    name, gf, cfg = model
    max_offset = {"smollm2": 1.0, "gemma3": 4.0}[name]
    prompts = golden(name)["top_logits"]["prompts"]
    plan = make_plan(cfg, gf.tensors, world)
    tw = ThreadWorld(world)

    def rank(r):
        m = RankModel(cfg, plan.ranks[r], world, tw.reducer(r) if world > 1 else no_reduce, gf)
        m.allocate_cache(1, 128)
        outs = []
        for p in prompts:
            n = len(p["ids"])
            outs.append(m.forward(torch.tensor(p["ids"]), torch.arange(n), torch.zeros(n, dtype=torch.long)))
        return outs

    per_rank = tw.run(rank)
    checked = 0
    for i, p in enumerate(prompts):
        logits = torch.cat([per_rank[r][i] for r in range(world)], dim=-1)
        for pos, top in enumerate(p["top"]):
            ids = [t[0] for t in top]
            vals = torch.tensor([t[1] for t in top])
            diff = logits[pos, ids] - vals
            assert (diff - diff.mean()).abs().max() < 1.0, (p["name"], pos)
            assert diff.abs().max() < max_offset, (p["name"], pos)
            if vals[0] - vals[1] > 0.5:
                assert int(logits[pos].argmax()) == ids[0], (p["name"], pos)
                checked += 1
    assert checked >= 10

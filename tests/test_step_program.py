"""Decode steps recorded once and replayed from C++ (model/step_program.py) give the eager step's
logits bit for bit: every architecture (the mixtures of experts through the experts op: qwen3moe,
qwen2moe's shared expert, gpt-oss's biases, sinks and MXFP4), both numerics, batches of 1, 3 and 16 sequences, past a
sliding window's wrap; a model that allocates a new cache drops its programs; a step that reads data
the model does not hold stays eager; a 2-worker world replays its all-reduce."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

from cli_helpers import run_cli
from synthetic import write_model
from tensorsplit import kernels
from tensorsplit.comm.local import ThreadWorld
from tensorsplit.kernels.choice import choose_kernels
from tensorsplit.kernels.quants import _common
from tensorsplit.kernels.numerics import EXACT, LLAMACPP
from tensorsplit.model import make_plan, open_model
from tensorsplit.model.layers import no_reduce
from tensorsplit.model.step_program import REPLAY_ENV
from tensorsplit.model.transformer import RankModel

ARCHS = {
    "llama": dict(types={"attn_q": Q.Q4_0, "ffn_down": Q.Q4_K}),
    "qwen2": dict(types={"attn_k": Q.Q8_0}),
    "qwen3": dict(head_dim=64),
    "phi3": dict(fused_qkv=True),
    "gemma3": dict(window=4),        # sliding layers: the ring wraps within the steps below
    # a K-quant embedding: its lookup decodes with tables made on first use, in the recorded step itself
    "qwen3moe": dict(head_dim=64, n_expert=8, n_expert_used=2, n_ff_exp=128,
                     types={"token_embd": Q.Q4_K, "ffn_gate_exps": Q.Q4_0, "ffn_up_exps": Q.Q8_0,
                            "ffn_down_exps": Q.Q4_1}),
    "qwen2moe": dict(n_expert=8, n_expert_used=2, n_ff_exp=128, n_ff_shexp=256),
    "gpt-oss": dict(n_expert=8, n_expert_used=4, n_ff_exp=128, window=4,
                    extra_kv={"gpt-oss.rope.scaling.type": ("yarn", V.STRING),
                              "gpt-oss.rope.scaling.factor": (32.0, V.FLOAT32)},
                    types={"ffn_gate_exps": Q.MXFP4, "ffn_up_exps": Q.MXFP4, "ffn_down_exps": Q.MXFP4}),
}


def _model(path, numerics, monkeypatch, replay: bool, n_slots: int):
    monkeypatch.setenv(REPLAY_ENV, "1" if replay else "0")
    gf, cfg = open_model(path)
    m = RankModel(cfg, make_plan(cfg, gf.tensors, 1).ranks[0], 1, no_reduce, gf, choose_kernels("cpu", numerics))
    m.allocate_cache(n_slots, 64)
    return m


def _decode(m, n_slots: int, steps: int) -> list[torch.Tensor]:
    """`steps` decode steps of n_slots sequences, one token each, all logits."""
    out = []
    for p in range(steps):
        ids = torch.tensor([(7 * p + 13 * s) % 300 for s in range(n_slots)])
        out.append(m.forward(ids, torch.full((n_slots,), p), torch.arange(n_slots), torch.arange(n_slots)))
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_replayed_steps_equal_eager_ones(arch, tmp_path, monkeypatch):
    if not kernels.native():
        pytest.skip("replay runs with the native kernels")
    path = write_model(tmp_path / f"{arch}.gguf", arch, n_layers=2, n_embd=256, n_heads=8, n_kv=2, n_ff=512,
                       vocab=300, **ARCHS[arch])
    for numerics in (LLAMACPP, EXACT):
        for n_slots in (1, 3, 16):
            eager = _decode(_model(path, numerics, monkeypatch, False, n_slots), n_slots, 7)
            _common.const.cache_clear()      # the decoders' tables made anew, inside the first (recorded) step
            m = _model(path, numerics, monkeypatch, True, n_slots)
            replayed = _decode(m, n_slots, 7)
            assert m.programs and all(p is not None for p in m.programs.values()), (arch, m.programs)
            for p, (a, b) in enumerate(zip(eager, replayed)):
                assert torch.equal(a, b), (arch, numerics.mode, n_slots, p, float((a - b).abs().max()))


def test_a_new_cache_drops_the_programs(tmp_path, monkeypatch):
    if not kernels.native():
        pytest.skip("replay runs with the native kernels")
    path = write_model(tmp_path / "llama.gguf", "llama", n_layers=2)
    m = _model(path, LLAMACPP, monkeypatch, True, 1)
    _decode(m, 1, 2)
    assert m.programs
    m.allocate_cache(1, 32)                           # new cache and rope tables: a program would hold the old
    assert m.programs == {}
    after = _decode(m, 1, 3)
    assert torch.equal(after[2], _decode(_model(path, LLAMACPP, monkeypatch, False, 1), 1, 3)[2])


def test_a_step_that_reads_other_data_stays_eager(tmp_path, monkeypatch):
    """Two ranks in one process sum through a Python function (comm/local.py), which hands each rank
    tensors the other made: no program could hold them, so both ranks' steps stay eager."""
    if not kernels.native():
        pytest.skip("replay runs with the native kernels")
    monkeypatch.setenv(REPLAY_ENV, "1")
    path = write_model(tmp_path / "llama.gguf", "llama", n_layers=2)
    gf, cfg = open_model(path)
    plan = make_plan(cfg, gf.tensors, 2)
    tw = ThreadWorld(2)

    def rank(r):
        m = RankModel(cfg, plan.ranks[r], 2, tw.reducer(r), gf, choose_kernels("cpu", LLAMACPP))
        m.allocate_cache(1, 16)
        for p in range(3):
            m.forward(torch.tensor([p + 1]), torch.tensor([p]), torch.tensor([0]), torch.tensor([0]))
        return m.programs

    for programs in tw.run(rank):
        assert programs == {(1, 1): None}


def test_two_workers_replay_the_same_logits_as_eager(smollm2_path, tmp_path):
    runs = {}
    for replay in ("1", "0"):
        logits = tmp_path / f"replay{replay}.npy"
        r = run_cli("generate", "-m", str(smollm2_path), "-p", "The capital of France is", "-n", "8", "--temp", "0",
                    "--json", "--save-logits", str(logits), "--nproc-per-node", "2",
                    env={REPLAY_ENV: replay, "TENSORSPLIT_DEBUG": "1"})
        assert r.returncode == 0, r.stderr
        assert "stay eager" not in r.stderr                  # every step of the replaying run was replayable
        runs[replay] = (json.loads(r.stdout.strip().splitlines()[-1])["token_ids"], np.load(logits))
    assert runs["1"][0] == runs["0"][0]
    assert np.array_equal(runs["1"][1], runs["0"][1])

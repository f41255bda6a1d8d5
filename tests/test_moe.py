"""Mixture-of-experts layers (model/moe.py, the kernels' `experts`) against float64 references built
from gguf-py's dequantization, and the router's edge cases.

- experts: every block format, on the native kernels and the torch reference, at token rows 1-16 and
  128, exact numerics: each token's weighted sum over its experts, against the same sum in float64 of
  gguf-py's dequantized weights. Tolerance 2e-5 of the output's scale (float32 matmuls of K <= 512;
  seen below 2e-6); a wrong expert, block or weight is off by O(1).
- the router: softmax, top-k by probability with ties to the lower expert id, renormalised where
  the arch says; an expert no token chooses is never read; all tokens on one expert; a batch of 16
  gives each token the bits it gets alone.
- a file whose experts' gate and up come fused (ffn_gate_up_exps) gives the logits of the same file
  with them apart, bit for bit, at 1 and 2 ranks.
(Whole models against a float64 reference and bit for bit across world sizes: test_archs.py; against
llama.cpp: test_arch_goldens.py.)
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from synthetic import random_quantized
from tensorsplit import kernels
from tensorsplit.kernels.base import MatmulInput
from tensorsplit.kernels.numerics import EXACT, LLAMACPP
from tensorsplit.kernels.quants import QWeight
from tensorsplit.kernels.torch_kernels import TorchKernels
from tensorsplit.model.arch import MoeSpec
from tensorsplit.model.layers import no_reduce
from tensorsplit.model.moe import MoE
from test_kernels import FLOATS, QUANTS

N_EMBD, N_FF, N_EXPERT, N_USED = 256, 256, 6, 2


def _kernels(which: str, numerics=EXACT):
    if which == "native":
        if not kernels.native():
            pytest.fail("the native kernels did not build")
        from tensorsplit.kernels.native_kernels import NativeKernels
        return NativeKernels(numerics)
    return TorchKernels(numerics)


def _raw(qtype, n_rows, n_cols, rng):
    raw = random_quantized(qtype, n_rows, n_cols, rng, std=1.0 / n_cols ** 0.5)
    return raw if raw.dtype == np.uint8 or qtype == Q.F32 else raw.view(np.uint8)


def _dense(raw, qtype, n_cols) -> np.ndarray:
    return dequantize(raw, qtype).astype(np.float64).reshape(-1, n_cols)


class Experts:
    """N_EXPERT random experts of one format: the kernels' weights and gguf-py's dense float64 ones."""

    def __init__(self, qtype, k, rng):
        self.gate_raw = [_raw(qtype, N_FF, N_EMBD, rng) for _ in range(N_EXPERT)]
        self.up_raw = [_raw(qtype, N_FF, N_EMBD, rng) for _ in range(N_EXPERT)]
        self.down_raw = [_raw(qtype, N_EMBD, N_FF, rng) for _ in range(N_EXPERT)]
        load = lambda raws, rows, cols: [k.load(QWeight.from_numpy(r, qtype, rows, cols, f"e{i}"))  # noqa: E731
                                         for i, r in enumerate(raws)]
        self.gate, self.up = load(self.gate_raw, N_FF, N_EMBD), load(self.up_raw, N_FF, N_EMBD)
        self.down = load(self.down_raw, N_EMBD, N_FF)
        self.dense = [(_dense(g, qtype, N_EMBD), _dense(u, qtype, N_EMBD), _dense(d, qtype, N_FF))
                      for g, u, d in zip(self.gate_raw, self.up_raw, self.down_raw)]

    def reference(self, x, selected, weights) -> np.ndarray:
        x = x.astype(np.float64)
        out = np.zeros((x.shape[0], N_EMBD))
        for t in range(x.shape[0]):
            for j, e in enumerate(selected[t]):
                g, u, d = self.dense[e]
                a, b = g @ x[t], u @ x[t]
                out[t] += float(weights[t, j]) * (d @ (a / (1 + np.exp(-a)) * b))
        return out


def _routing(n, rng):
    selected = np.stack([rng.choice(N_EXPERT, N_USED, replace=False) for _ in range(n)])
    weights = rng.uniform(0.1, 1.0, (n, N_USED)).astype(np.float32)
    return torch.from_numpy(selected).long(), torch.from_numpy(weights)


@pytest.mark.parametrize("which", ["native", "torch"])
@pytest.mark.parametrize("qtype", QUANTS + FLOATS + [Q.F32], ids=lambda q: q.name)
def test_experts_match_a_float64_reference(qtype, which):
    k = _kernels(which)
    rng = np.random.default_rng(int(qtype) + 100)
    ex = Experts(qtype, k, rng)
    for n in list(range(1, 17)) + [128]:
        x = rng.standard_normal((n, N_EMBD)).astype(np.float32)
        selected, weights = _routing(n, rng)
        y = k.experts(torch.from_numpy(x), k.pack_experts(ex.gate, ex.up, ex.down), selected, weights, "silu")
        assert y.dtype == torch.float64 and y.shape == (n, N_EMBD)
        ref = ex.reference(x, selected.numpy(), weights.numpy())
        err = np.abs(y.numpy() - ref).max() / np.abs(ref).max()
        assert err < 2e-5, f"{qtype.name} {which} rows {n}: relative error {err:.2e}"


@pytest.mark.parametrize("numerics", [LLAMACPP, EXACT], ids=["llamacpp", "exact"])
@pytest.mark.parametrize("qtype,glu", [(Q.Q4_0, "silu"), (Q.Q4_K, "silu"), (Q.Q6_K, "silu"), (Q.Q4_1, "swiglu_oai"),
                                       (Q.MXFP4, "swiglu_oai")], ids=lambda v: getattr(v, "name", v))
def test_the_experts_op_is_the_per_expert_path_bit_for_bit(qtype, glu, numerics):
    """The experts op (csrc/experts.cpp) schedules a few tokens as (token, expert) GEMVs and more by expert
    (each expert a GEMM over its tokens, in row ranges that the threads take as they come); both give
    the bits of the eager per-expert path (TorchKernels.experts over the same native matmuls), at 1 and
    2 threads, where experts hold different row counts on this rank (as a split of few blocks gives
    them), one holds none, and gpt-oss's biases are on."""
    k = _kernels("native", numerics)
    rng = np.random.default_rng(int(qtype) + 7)
    block = 256 if qtype in (Q.Q4_K, Q.Q6_K) else 64
    rows = [N_FF, block, 0, N_FF, 2 * block if 2 * block <= N_FF else block, N_FF]
    load = lambda r, n_rows, n_cols, name: k.load(QWeight.from_numpy(r, qtype, n_rows, n_cols, name))  # noqa: E731
    gate = [load(_raw(qtype, r, N_EMBD, rng), r, N_EMBD, f"g{e}") if r else None for e, r in enumerate(rows)]
    up = [load(_raw(qtype, r, N_EMBD, rng), r, N_EMBD, f"u{e}") if r else None for e, r in enumerate(rows)]
    down = [load(_raw(qtype, N_EMBD, r, rng), N_EMBD, r, f"d{e}") if r else None for e, r in enumerate(rows)]
    biases = (None, None)
    if glu == "swiglu_oai":
        biases = tuple([torch.from_numpy(rng.standard_normal(r).astype(np.float32)) if r else None for r in rows]
                       for _ in range(2))
    packed = k.pack_experts(gate, up, down, *biases)
    assert packed.fused is not None
    threads = torch.get_num_threads()
    try:
        for n in (1, 4, 5, 40):
            x = torch.from_numpy(rng.standard_normal((n, N_EMBD)).astype(np.float32) * 2)
            selected = torch.from_numpy(np.stack([rng.choice(len(rows), 3, replace=False) for _ in range(n)]))
            weights = torch.from_numpy(rng.uniform(0.1, 1.0, (n, 3)).astype(np.float32))   # top-3: order shows
            eager = TorchKernels.experts(k, MatmulInput(x), packed, selected, weights, glu)
            for t in (1, 2):
                torch.set_num_threads(t)
                op = k.experts(MatmulInput(x), packed, selected, weights, glu)
                assert torch.equal(op, eager), (qtype.name, numerics, n, t)
    finally:
        torch.set_num_threads(threads)


class Recording:
    """Kernels that remember which weights their matmuls read."""

    def __init__(self, inner):
        self.inner, self.read = inner, set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def matmul(self, x, w, wide=False):
        self.read.add(w.name)
        return self.inner.matmul(x, w, wide)

    # the reference's experts and per-expert FFN, run with this object's matmul
    experts = TorchKernels.experts
    _ffn = TorchKernels._ffn


def _moe(k, ex: Experts, router: np.ndarray, norm: bool) -> MoE:
    r = torch.from_numpy(router.astype(np.float64))         # an F32 router, as load_router holds it
    return MoE(r, ex.gate, ex.up, ex.down, N_USED, MoeSpec(norm_weights=norm), "silu", no_reduce, k)


def _route_reference(h, router, norm):
    logits = h.astype(np.float64) @ router.T.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :N_USED]
    w = np.take_along_axis(p, top, -1)
    return top, (w / w.sum(-1, keepdims=True) if norm else w)


@pytest.mark.parametrize("norm", [True, False], ids=["renormalised", "raw"])
def test_router_ties_go_to_the_lower_expert(norm):
    """Experts 1, 4 and 5 have the same router row, which wins: 1 is taken first, then 4, not 5. Small
    integers throughout, so that the logits are exact in any summation order and the tie is exact.
    Weights as the reference's."""
    rng = np.random.default_rng(3)
    k = TorchKernels(EXACT)
    ex = Experts(Q.Q8_0, k, rng)
    router = rng.integers(0, 2, (N_EXPERT, N_EMBD)).astype(np.float32) / 64
    router[1] = router[4] = router[5] = 2 / 64
    h = rng.integers(0, 4, (5, N_EMBD)).astype(np.float32)              # >= 0: the shared row wins
    moe = _moe(k, ex, router, norm)
    selected, weights = moe.route(MatmulInput(torch.from_numpy(h)))
    assert selected.tolist() == [[1, 4]] * 5
    top, w = _route_reference(h, router, norm)
    assert (selected.numpy() == top).all()
    np.testing.assert_allclose(weights.numpy(), w, rtol=1e-5)


def test_unchosen_experts_are_not_read_and_one_expert_can_take_every_token():
    """A router that sends every token to experts 2 and 3 (all tokens on one expert, and on the other):
    only their weights are read, and the output is the float64 reference's."""
    rng = np.random.default_rng(4)
    inner = TorchKernels(EXACT)
    ex = Experts(Q.Q4_K, inner, rng)
    router = np.zeros((N_EXPERT, N_EMBD), np.float32)
    router[2], router[3] = 1.0, 0.5
    h = np.abs(rng.standard_normal((7, N_EMBD))).astype(np.float32) / 8
    k = Recording(inner)
    moe = _moe(k, ex, router, norm=True)
    y = moe(torch.from_numpy(h))
    assert k.read == {"e2", "e3"}, k.read
    top, w = _route_reference(h, router, True)
    assert (top == [2, 3]).all()
    ref = ex.reference(h, top, w)
    assert np.abs(y.double().numpy() - ref).max() < 2e-5 * np.abs(ref).max()


@pytest.mark.parametrize("numerics", [LLAMACPP, EXACT], ids=["llamacpp", "exact"])
def test_a_batch_of_16_gives_each_token_its_bits_alone(numerics):
    """Routing and experts per token do not depend on the batch: 16 tokens at once (a decode step) and 40
    (a prompt), both grouped by expert (each group a gemm), equal each token alone (a gemv per expert),
    bit for bit, in formats of each activation kind and min term, with gpt-oss's
    biases and SwiGLU-OAI too."""
    from tensorsplit.model.moe import ExpertBiases
    for qtype, glu in ((Q.Q4_0, "silu"), (Q.Q4_K, "silu"), (Q.Q4_1, "swiglu_oai"), (Q.MXFP4, "swiglu_oai")):
        rng = np.random.default_rng(5)
        k = _kernels("native", numerics)
        ex = Experts(qtype, k, rng)
        router = rng.standard_normal((N_EXPERT, N_EMBD)).astype(np.float32) / 16
        biases = None
        if glu == "swiglu_oai":
            biases = ExpertBiases(*([torch.from_numpy(rng.standard_normal(N_FF).astype(np.float32)) for _ in
                                     range(N_EXPERT)] for _ in range(2)),
                                  torch.from_numpy(rng.standard_normal((N_EXPERT, N_EMBD)).astype(np.float32)))
        moe = MoE(torch.from_numpy(router.astype(np.float64)), ex.gate, ex.up, ex.down, N_USED,
                  MoeSpec(norm_weights=True, activation=glu if glu != "silu" else None), "silu", no_reduce, k,
                  biases=biases)
        assert moe.experts.fused is not None, qtype.name      # the decode steps take the experts op
        h = torch.from_numpy(rng.standard_normal((40, N_EMBD)).astype(np.float32) * 3)
        alone = torch.cat([moe(h[i:i + 1]) for i in range(40)])
        assert torch.equal(moe(h[:16]), alone[:16]), (qtype.name, glu)
        assert torch.equal(moe(h), alone), (qtype.name, glu)


def test_experts_of_few_blocks_are_shared_out_in_rotation(tmp_path):
    """768 = 3 blocks of 256 (Qwen3-30B-A3B's experts in K-quants): 2 ranks hold 2 + 1 blocks of the even
    experts and 1 + 2 of the odd ones, so both hold half of all; 4 ranks hold each expert on 3 of them,
    in turn; every block of every expert is held exactly once; 3,1 shares by ratio over the experts."""
    from synthetic import write_model
    from tensorsplit.model import make_plan, open_model
    path = write_model(tmp_path / "m.gguf", "qwen3moe", n_embd=256, n_heads=4, n_kv=2, head_dim=64, n_ff=512,
                       vocab=300, n_expert=8, n_expert_used=2, n_ff_exp=768,
                       types={"ffn_gate_exps": Q.Q4_K, "ffn_up_exps": Q.Q4_K, "ffn_down_exps": Q.Q6_K})
    gf, cfg = open_model(path)
    blocks = lambda rs: [(b - a) // 256 for a, b in rs.ffn_exp]     # noqa: E731
    two = make_plan(cfg, gf.tensors, 2).ranks
    assert blocks(two[0]) == [2, 1] * 4 and blocks(two[1]) == [1, 2] * 4
    four = make_plan(cfg, gf.tensors, 4).ranks
    assert [blocks(r)[:4] for r in four] == [[1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 1]]
    whole = make_plan(cfg, gf.tensors, 1).ranks[0].expert_nbytes
    for world, ratios in [(2, None), (3, None), (4, None), (2, (0.75, 0.25))]:
        ranks = make_plan(cfg, gf.tensors, world, ratios).ranks
        for e in range(8):
            runs = sorted(r.ffn_exp[e] for r in ranks if r.ffn_exp[e][1] > r.ffn_exp[e][0])
            assert runs[0][0] == 0 and runs[-1][1] == 768 and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        assert sum(r.expert_nbytes for r in ranks) == whole
    three_one = make_plan(cfg, gf.tensors, 2, (0.75, 0.25)).ranks
    assert sum(blocks(three_one[0])) == 18 and sum(blocks(three_one[1])) == 6, blocks(three_one[0])


@pytest.mark.slow
def test_commands_run_a_mixture_of_experts_across_workers(smollm2_path, tmp_path):
    """The commands, unchanged, on the Qwen2-MoE golden file (shared expert, SmolLM2's tokenizer) with 2
    worker processes: `perplexity`'s first two chunks against llama.cpp's (the golden's; within the
    0.05 nats per token test_arch_goldens allows, seen 0.003), `generate`'s greedy tokens equal at 1
    and 2 workers, `batch` gives the same text with 3 sequences at once, `info --json` shows each
    rank's expert bytes, half of the file's each."""
    import json
    from cli_helpers import ROOT, run_cli
    from golden_models import write_arch_model
    path = write_arch_model("qwen2moe", tmp_path / "qwen2moe.gguf", smollm2_path)
    golden = json.loads((ROOT / "tests" / "fixtures" / "arch_qwen2moe_golden.json").read_text())["perplexity"][0]
    r = run_cli("perplexity", "-m", str(path), "-f", str(ROOT / "tests" / "fixtures" / golden["text_file"]),
                "-c", str(golden["n_ctx"]), "--chunks", "2", "--json", "--nproc-per-node", "2")
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    assert ours["world"] == 2
    theirs = golden["chunks"][:2]
    ppl2 = math.exp(sum(c["nll_sum"] for c in theirs) / sum(c["count"] for c in theirs))
    assert abs(math.log(ours["ppl"] / ppl2)) < 0.05, (ours["ppl"], ppl2)
    tokens = {}
    for world in (1, 2):
        r = run_cli("generate", "-m", str(path), "-p", "The capital of France is", "-n", "8", "--temp", "0",
                    "--json", "--nproc-per-node", str(world))
        assert r.returncode == 0, r.stderr
        tokens[world] = json.loads(r.stdout.strip().splitlines()[-1])["text"]
    assert tokens[1] == tokens[2] and tokens[1]
    # `batch`, 3 sequences decoded together (each step's tokens grouped by expert), greedy: the prompt
    # generate ran gets generate's text
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    texts = ["The capital of France is", "2 + 2 =", "Once upon a time"]
    prompts.write_text("".join(json.dumps({"id": i, "prompt": t, "max_tokens": 8, "temperature": 0}) + "\n"
                               for i, t in enumerate(texts)))
    r = run_cli("batch", str(path), str(prompts), "-o", str(out), "-np", "3", "--nproc-per-node", "2")
    assert r.returncode == 0, r.stderr
    rows = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == [0, 1, 2] and rows[0]["text"] == tokens[1], (rows[0], tokens[1])
    r = run_cli("info", str(path), "--nproc-per-node", "2", "--json")
    assert r.returncode == 0, r.stderr
    ranks = json.loads(r.stdout)["shard_plan"]["ranks"]
    expert = [sum(t["nbytes"] for t in rank["tensors"] if t["split"].startswith(("exp_", "shexp_"))) for rank in ranks]
    assert expert[0] == expert[1] > 0


def test_fused_gate_up_experts_equal_separate_ones(tmp_path):
    from synthetic import fuse_gate_up_exps, write_model
    from test_archs import IDS, SYNTHETIC, world_logits
    from tensorsplit.model import open_model
    kw = dict(SYNTHETIC["qwen3moe"], types={"ffn_gate_exps": Q.Q4_K, "ffn_up_exps": Q.Q4_K, "ffn_down_exps": Q.Q5_0})
    separate = write_model(tmp_path / "separate.gguf", "qwen3moe", **kw)   # one fused tensor: one type
    fused = fuse_gate_up_exps(separate, tmp_path / "fused.gguf")
    (gf_a, cfg_a), (gf_b, cfg_b) = open_model(separate), open_model(fused)
    assert "blk.0.ffn_gate_up_exps.weight" in gf_b.tensors and "blk.0.ffn_up_exps.weight" not in gf_b.tensors
    for world in (1, 2):
        a, b = world_logits(gf_a, cfg_a, world, IDS), world_logits(gf_b, cfg_b, world, IDS)
        assert np.array_equal(a, b), (world, float(np.abs(a - b).max()))


def test_serve_runs_gpt_oss_across_workers(smollm2_path, tmp_path):
    """`serve` on the gpt-oss golden file (sinks, sliding layers, MXFP4 experts) with 2 worker processes:
    a greedy completion equals `generate`'s at 1 worker, and 3 completions streamed at once (decoded
    together, each step's tokens grouped by expert) each equal that prompt's own run, then the server
    stops cleanly."""
    import concurrent.futures
    import json
    from cli_helpers import assert_pids_gone, run_cli, workers_of
    from golden_models import write_arch_model
    from test_serve import Server
    path = write_arch_model("gpt-oss", tmp_path / "gpt-oss.gguf", smollm2_path)
    prompts = ["The capital of France is", "2 + 2 =", "Once upon a time"]
    r = run_cli("generate", "-m", str(path), "-p", prompts[0], "-n", "8", "--temp", "0", "--json",
                "--nproc-per-node", "1")
    assert r.returncode == 0, r.stderr
    ref = json.loads(r.stdout.strip().splitlines()[-1])["text"]
    s = Server(path, "--nproc-per-node", "2", "-np", "3", "-c", "256")
    try:
        client = s.client()

        def complete(p):
            c = client.completions.create(model="gpt-oss", prompt=p, max_tokens=8, temperature=0)
            return c.choices[0].text
        alone = [complete(p) for p in prompts]
        assert alone[0] == ref and all(alone), (alone, ref)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            together = list(pool.map(complete, prompts))
        assert together == alone
    finally:
        workers = list(workers_of(s.proc.pid).values())
        assert s.stop() == 0, s.err
        assert_pids_gone(workers)

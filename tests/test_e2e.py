"""End to end, as real processes on CPU (shared memory between the ranks; Gloo for the rest): the
launcher, workers, comm and coordinator.

Logits across world sizes and splits: the row-parallel partial sums are float64 through the all-reduce
and rounded once (model/layers.py), and every other output is computed whole by one rank, so the
logits of 1, 2 and 3 ranks and of --split 3,1 are the same bit for bit in both numerics, as the README
says, and the test asserts exactly that. (A float64 partial sum landing on a float32 rounding tie could
in principle move one value by an ulp; it has not happened on any CPU so far.)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from cli_helpers import ROOT, assert_all_gone, environ_of, run_cli, start_cli, workers_of
from fast_path import assert_fast_path, rank_counts

PROMPT = "The capital of France is"
N = 12


@pytest.mark.slow
def test_greedy_tokens_and_logits_agree_across_world_sizes(smollm2_path, tmp_path):
    """Every rank reports which kernels computed its matmuls (kernels/counting.py): the native
    kernels, and nothing else (a fallback to the torch path would give the same logits). In both
    numerics, greedy tokens are the same at every world size and split, and the logits are one rank's,
    bit for bit."""
    worlds = [("1", 1, []), ("2", 2, []), ("3", 3, []), ("2 split 3,1", 2, ["--split", "3,1"])]
    # exact numerics at 1 and 3 ranks only (its sharded equality on every split: test_model_parity, in process)
    for numerics, names in (("llamacpp", {"1", "2", "3", "2 split 3,1"}), ("exact", {"1", "3"})):
        runs = {}
        for name, world, args in [w for w in worlds if w[0] in names]:
            tag = f"{numerics}_{name.replace(' ', '_')}"
            logits = tmp_path / f"{tag}.npy"
            counts = tmp_path / f"{tag}.paths"
            counts.mkdir()
            r = run_cli("generate", "-m", str(smollm2_path), "-p", PROMPT, "-n", str(N), "--temp", "0", "--json",
                        "--save-logits", str(logits), "--nproc-per-node", str(world), "--numerics", numerics, *args,
                        env={"TENSORSPLIT_KERNEL_PATHS": str(counts)})
            assert r.returncode == 0, r.stderr
            for c in rank_counts(counts, world):
                assert_fast_path(c, "native", exclusive=True)
            runs[name] = (json.loads(r.stdout.strip().splitlines()[-1]), np.load(logits))
        base, base_logits = runs["1"]
        assert base["completion_tokens"] == N and base["text"]
        for name, (res, logits) in runs.items():
            assert res["token_ids"] == base["token_ids"], (numerics, name)
            assert logits.shape == base_logits.shape == (N, 49152)
            assert np.array_equal(logits, base_logits), (numerics, name, float(np.abs(logits - base_logits).max()))


def test_generate_streams_text_and_reports(smollm2_path):
    r = run_cli("generate", "-m", str(smollm2_path), "-p", PROMPT, "-n", "4", "--temp", "0", "--nproc-per-node", "2")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "generated 4 tokens" in r.stderr and "world 2 (gloo)" in r.stderr


def test_sampling_flags_reach_the_sampler(smollm2_path):
    """--seed makes a sampled run repeat (and another seed gives another text), --stop ends the text
    before the stop string. (Each sampler step's own tests are in test_sampling.py.)"""
    def gen(*flags):
        r = run_cli("generate", "-m", str(smollm2_path), "-p", PROMPT, "-n", "16", "--json", *flags)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])
    greedy = gen("--temp", "0")
    a, b, c = (gen("--temp", "1.5", "--seed", str(s)) for s in (3, 3, 4))
    assert a["token_ids"] == b["token_ids"] and a["token_ids"] != c["token_ids"]
    stop = greedy["text"].split()[2]
    cut = gen("--temp", "0", "--stop", stop)
    assert cut["finish_reason"] == "stop" and cut["text"] == greedy["text"][:greedy["text"].index(stop)]


def test_sigkill_of_a_worker_ends_everything(smollm2_path):
    """SIGKILL rank 1 mid-generation: the launcher exits non-zero within 15 s naming rank 1, nothing left."""
    job = start_cli("generate", "-m", str(smollm2_path), "-p", PROMPT, "-n", "2000", "-c", "4096", "--temp", "0",
                    "--nproc-per-node", "2")
    try:
        job.out.wait_for(lambda s: len(s) > 0, 180, "generated text")      # generation is under way
        workers = workers_of(job.pid)
        assert set(workers) == {0, 1}, workers
        # workers never see text: only rank 0 (the coordinator) is given the job, which holds the prompt;
        # the world both get (TENSORSPLIT_WORLD) holds none
        env = {r: environ_of(pid) for r, pid in workers.items()}
        cmdline = {r: open(f"/proc/{pid}/cmdline", "rb").read().decode() for r, pid in workers.items()}
        assert "TENSORSPLIT_JOB" not in env[1] and PROMPT not in "".join(env[1].values()) + cmdline[1]
        assert PROMPT in open(env[0]["TENSORSPLIT_JOB"]).read()
        assert env[0]["TENSORSPLIT_WORLD"] == env[1]["TENSORSPLIT_WORLD"] and PROMPT not in env[0]["TENSORSPLIT_WORLD"]
        os.kill(workers[1], signal.SIGKILL)
        code, err, elapsed = job.finish(15)
    finally:
        job.kill()
    assert code == 1
    assert elapsed < 15
    lines = [ln for ln in err.splitlines() if ln.startswith("tensorsplit:")]
    assert lines[-1] == "tensorsplit: rank 1 failed: killed by SIGKILL", err
    assert "Traceback" not in err
    # the streamed text's last line is closed, so on a terminal the error starts a line of its own
    assert job.out.text().endswith("\n")
    assert_all_gone(job.pid)


def test_bad_input_gives_one_line(tmp_path):
    missing = tmp_path / "nope.gguf"
    r = run_cli("generate", "-m", str(missing), "-p", "x")
    assert r.returncode == 1 and r.stderr.strip() == f"tensorsplit: error: {missing}: no such file"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x07\x00\x00\x00" + b"\x00" * 32)
    r = run_cli("info", str(bad))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "header.version" in r.stderr


def test_bad_flags_fail_once_before_any_worker_starts(smollm2_path):
    r = run_cli("generate", "-m", str(smollm2_path), "-p", "x", "--nproc-per-node", "2", "--split", "3,1,1")
    assert r.returncode == 1
    assert r.stderr.strip() == "tensorsplit: error: --split '3,1,1' has 3 shares but the world has 2 ranks"
    r = run_cli("generate", "-m", str(smollm2_path), "-p", "x", "--nproc-per-node", "2", "--device", "cpu,cpu,cpu")
    assert r.returncode == 1
    assert r.stderr.strip() == "tensorsplit: error: --device 'cpu,cpu,cpu' lists 3 devices for a world of 2 ranks"


def test_info_and_tokenize_on_default_model():
    r = run_cli("info", "--nproc-per-node", "2")
    assert r.returncode == 0, r.stderr
    assert "9 heads, 3 KV heads" in r.stdout and "world 2" in r.stdout
    j = json.loads(run_cli("info", "--nproc-per-node", "2", "--split", "3,1", "--json").stdout)
    ranks = j["shard_plan"]["ranks"]
    assert len(ranks) == 2 and ranks[0]["ffn"] == [0, 1152]
    r = run_cli("tokenize", "-p", "Hello world")
    assert r.returncode == 0 and json.loads(r.stdout) == [19556, 905]


@pytest.mark.slow
def test_bench_prints_both_tables():
    r = run_cli("bench", "--nproc-per-node", "1,2", "-p", "16", "-n", "4", "-r", "1")
    assert r.returncode == 0, r.stderr
    table, _, js = r.stdout.partition("\n\n")
    assert "| model | world |" in table and "pp16" in table and "tg4" in table
    doc = json.loads(js)
    assert [w["world"] for w in doc["worlds"]] == [1, 2]
    assert all(res["tokens_per_s"] > 0 for w in doc["worlds"] for res in w["results"])


def test_bench_at_depths_as_llama_bench():
    """bench -d 0,40: every test at each cache depth, named as llama-bench names them ("tg2 @ d40"), with
    the depth in the JSON; a bad depth list is a one-line usage error."""
    r = run_cli("bench", "--nproc-per-node", "1", "-p", "8", "-n", "2", "-r", "1", "-d", "0,40")
    assert r.returncode == 0, r.stderr
    table, _, js = r.stdout.partition("\n\n")
    doc = json.loads(js)
    assert doc["n_depth"] == [0, 40]
    (world,) = doc["worlds"]
    assert [(x["test"], x["n_depth"]) for x in world["results"]] == [("pp8", 0), ("tg2", 0), ("pp8 @ d40", 40),
                                                                       ("tg2 @ d40", 40)]
    assert "| tg2 @ d40 |" in table and all(x["tokens_per_s"] > 0 for x in world["results"])
    bad = run_cli("bench", "--nproc-per-node", "1", "-d", "0,x")
    assert bad.returncode == 2 and "-d/--n-depth" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_comm_times_both_paths():
    """bench --comm: the shared-memory path and plain Gloo at every message size, as a table and JSON
    (times are reported, never asserted against each other)."""
    r = run_cli("bench", "--comm", "--nproc-per-node", "2", "-r", "1")
    assert r.returncode == 0, r.stderr
    table, _, js = r.stdout.partition("\n\n")
    assert "| world | path |" in table and "shared memory" in table
    doc = json.loads(js)
    (world,) = doc["worlds"]
    assert world["world"] == 2 and world["dtype"] == "float64"
    assert [x["rows"] for x in world["results"]] == [1, 4, 16, 64, 256][:len(world["results"])]
    assert all(x["bytes"] == 8 * 576 * x["rows"] and x["auto_us"] > 0 and x["gloo_us"] > 0 for x in world["results"])
    assert all(x["exchange_us"] > 0 and x["doubling_us"] > 0 and x["all_gather_us"] > 0 for x in world["results"])
    one = run_cli("bench", "--comm", "--nproc-per-node", "1")
    assert one.returncode == 1 and "at least 2 ranks" in one.stderr


def test_torchrun_command_from_readme(smollm2_path):
    """README: torchrun --nproc-per-node 2 -m tensorsplit.worker generate ... gives the launcher's tokens."""
    args = ["generate", "-m", str(smollm2_path), "-p", PROMPT, "-n", "6", "--temp", "0", "--json"]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "tensorsplit.worker", *args],
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    ours = run_cli(*args, "--nproc-per-node", "2")
    assert ours.returncode == 0, ours.stderr
    pick = lambda out: json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["token_ids"]  # noqa: E731
    assert pick(r.stdout) == pick(ours.stdout)


def test_perplexity_command_matches_in_process_and_takes_numerics(smollm2_path):
    """`tensorsplit perplexity` at 2 workers equals the coordinator's perplexity() over 2 ranks as
    threads in this process, in each numerics mode: --numerics llamacpp must reach the workers and
    round there as it does in-process (seen over these 126 tokens: exact 30.07, llamacpp 28.60;
    llama.cpp itself gives 29.36). One thread per rank on both sides, so that both run the same
    float32 kernels in the same order: seen identical to the last digit; allowed 1e-9 relative."""
    from test_llamacpp_golden import world_forward
    from tensorsplit.coordinator.perplexity import perplexity
    from tensorsplit.coordinator.tokenizer import Tokenizer
    from tensorsplit.model import open_model
    from tensorsplit.kernels.numerics import Numerics

    text = ROOT / "tests" / "fixtures" / "english.txt"
    args = ["perplexity", "-m", str(smollm2_path), "-f", str(text), "-c", "128", "--chunks", "2", "--json",
            "--nproc-per-node", "2", "--threads", "1"]
    cli = {mode: json.loads(run_cli(*args, "--numerics", mode).stdout) for mode in ("exact", "llamacpp")}
    gf, cfg = open_model(smollm2_path)
    tok = Tokenizer.from_gguf_kv(gf.kv)
    tokens = tok.encode(text.read_text(), add_special=True)
    ref, threads = {}, torch.get_num_threads()
    for mode in ("exact", "llamacpp"):
        torch.set_num_threads(1)
        try:
            ref[mode] = perplexity(world_forward(gf, cfg, 2, 128, Numerics(mode)), tokens, 128,
                                   tok.bos_id if tok.add_bos else None, max_chunks=2).ppl
        finally:
            torch.set_num_threads(threads)
    for mode in ("exact", "llamacpp"):
        assert cli[mode]["scored_tokens"] == 126 and cli[mode]["world"] == 2
        assert abs(cli[mode]["ppl"] / ref[mode] - 1) < 1e-9, (mode, cli[mode]["ppl"], ref[mode])
    assert abs(ref["llamacpp"] / ref["exact"] - 1) > 0.01       # the modes are told apart

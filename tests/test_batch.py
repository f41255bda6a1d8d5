"""Batched generation and `tensorsplit batch`: results unchanged by batching, resumable output,
bad input lines reported by number."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import ROOT, assert_pids_gone, run_cli, wait_for_workers
from tensorsplit.kernels.choice import choose_kernels
from tensorsplit.kernels.numerics import LLAMACPP
from tensorsplit.coordinator.batch_io import BadLine, InputLine, done_ids, parse_line
from tensorsplit.coordinator.generate import Generator, Request, generate_one
from tensorsplit.coordinator.sampling import SamplingParams
from tensorsplit.coordinator.tokenizer import Tokenizer
from tensorsplit.model import make_plan, open_model
from tensorsplit.model.layers import no_reduce
from tensorsplit.model.transformer import RankModel

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
           "Water boils at", "My favourite food is", "In 1969, humans", "The quick brown fox"]


@pytest.mark.slow
def test_batch_of_8_equals_8_single_runs(smollm2_path):
    gf, cfg = open_model(smollm2_path)
    model = RankModel(cfg, make_plan(cfg, gf.tensors, 1).ranks[0], 1, no_reduce, gf, choose_kernels("cpu", LLAMACPP))
    model.allocate_cache(8, 128)
    tok = Tokenizer.from_gguf_kv(gf.kv)
    greedy = SamplingParams(temperature=0)
    # alone: each in slot 0 of the same cache
    alone = [generate_one(model.forward, tok, tok.encode(p), greedy, 12, 128).token_ids for p in PROMPTS]
    # together: 8 slots, different prompt lengths, so prefill and decode tokens share steps;
    # max_tokens differ so slots free up at different times
    batched = {}
    reqs = [Request(i, tok.encode(p), greedy, 12) for i, p in enumerate(PROMPTS)]
    Generator(model.forward, tok, 8, 128, n_batch=16).run(reqs, lambda r, res: batched.__setitem__(r.key, res))
    assert [batched[i].token_ids for i in range(8)] == alone
    # continuous batching: 3 slots for 8 prompts refill as sequences finish
    refilled = {}
    Generator(model.forward, tok, 3, 128).run(reqs, lambda r, res: refilled.__setitem__(r.key, res))
    assert [refilled[i].token_ids for i in range(8)] == alone


@pytest.mark.parametrize("line,reason", [
    ("not json", "line 7: not valid JSON"),
    ('{"id": 1}', "exactly one of 'prompt' or 'messages'"),
    ('{"prompt": "hi"}', "no 'id'"),
    ('{"id": 1, "prompt": 5}', "'prompt' must be a string, got int"),
    ('{"id": 1, "prompt": "hi", "max_tokens": "many"}', "'max_tokens' must be an integer"),
    ('{"id": 1, "prompt": "hi", "temperature": true}', "'temperature' must be a number"),
    ('{"id": 1, "prompt": "hi", "colour": "red"}', "unknown field(s) 'colour'"),
    ('{"id": 1, "prompt": "  "}', "'prompt' is empty"),
    ('{"id": [1], "prompt": "hi"}', "'id' must be a string or an integer"),
    ('{"id": 1, "messages": [{"role": "user"}]}', "'messages' must be a non-empty list"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_lines_are_named(line, reason):
    item = parse_line(7, line)
    assert isinstance(item, BadLine) and reason in str(item) and str(item).startswith("line 7: ")


def test_good_line_parses():
    item = parse_line(1, '{"id": "a", "prompt": "hi", "max_tokens": 3, "stop": "x", "seed": 4}')
    assert isinstance(item, InputLine) and item.options == {"max_tokens": 3, "stop": ["x"], "seed": 4}


def test_done_ids_drops_a_cut_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": 1, "text": "a"}\n{"id": "x", "text": "b"}\n{"id": 3, "te')
    assert done_ids(out) == {"1", '"x"'}
    assert out.read_bytes().endswith(b'"b"}\n')


def _write_prompts(path, n, bad=False):
    lines = [json.dumps({"id": i, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 6 + i % 3, "temperature": 0})
             for i in range(n)]
    if bad:
        lines[2:2] = ["{not json", json.dumps({"id": 99, "prompt": ""}), json.dumps({"id": 98, "prompt": "x", "top": 1})]
    path.write_text("\n".join(lines) + "\n")


def test_batch_cli_skips_or_fails_on_bad_lines(smollm2_path, tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    _write_prompts(prompts, 3, bad=True)
    r = run_cli("batch", str(smollm2_path), str(prompts), "-o", str(out), "--on-error", "fail")
    assert r.returncode == 1 and (not out.exists() or out.read_text() == ""), r.stderr
    assert "line 3: not valid JSON" in r.stderr and "nothing generated" in r.stderr
    r = run_cli("batch", str(smollm2_path), str(prompts), "-o", str(out), "-np", "2")
    assert r.returncode == 0, r.stderr
    assert "line 4: 'prompt' is empty (skipped)" in r.stderr and "line 5: unknown field(s) 'top'" in r.stderr
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [0, 1, 2]
    assert all(r["finish_reason"] in ("length", "eos") and r["completion_tokens"] >= 1 for r in rows)


@pytest.mark.slow
def test_batch_killed_midway_then_rerun_gives_one_line_per_id(smollm2_path, tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    n = 10
    _write_prompts(prompts, n)
    cmd = [sys.executable, "-m", "tensorsplit", "batch", str(smollm2_path), str(prompts), "-o", str(out),
           "-np", "2", "--nproc-per-node", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        workers = wait_for_workers(proc.pid, 2)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
            time.sleep(0.05)
        assert proc.poll() is None, "the batch ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)     # the launcher; its workers die with it
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_pids_gone(workers.values())
    first = out.read_text().splitlines()
    assert 2 <= len(first) < n
    r = run_cli("batch", str(smollm2_path), str(prompts), "-o", str(out), "-np", "3", "--nproc-per-node", "2")
    assert r.returncode == 0, r.stderr
    assert "already in" in r.stderr
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(n))
    assert out.read_text().splitlines()[:len(first)] == first   # finished lines kept as they were


def test_python_api_batches_in_input_order(smollm2_path):
    from tensorsplit import LLM
    import os

    from cli_helpers import assert_pids_gone, workers_of
    from tensorsplit.worker.pinning import threads_affinity
    cores = os.sched_getaffinity(0)
    with LLM(smollm2_path, nproc_per_node=2, parallel=3, n_ctx=128) as llm:
        res = llm.generate(PROMPTS[:4], max_tokens=5, temperature=0)
        alone = llm.generate(PROMPTS[2], max_tokens=5, temperature=0)
        workers = list(workers_of(os.getpid()).values())
    assert len(workers) == 1
    # rank 0 ran on this process's threads, pinned to its own core: closing gives every thread its cores
    # back (a later world and the processes it starts inherit the mask)
    assert all(mask == cores for mask in threads_affinity(os.getpid()).values())
    assert_pids_gone(workers)                # README: the worker processes end with the LLM
    assert len(res) == 4 and all(r.completion_tokens == 5 for r in res)
    assert res[2].token_ids == alone[0].token_ids
    assert "Paris" in res[0].text

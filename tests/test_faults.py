"""Faults end every process of the job within a bounded time, exit non-zero with one line naming the
rank and the cause, leave no orphans, and lose no finished output. Each has a hard deadline, and
each acts only once the job is where the test means it to be: a paused rank announces its pause
(worker/faults.py), decoding shows as text on stdout. (SIGKILL of a worker during decode is in
test_e2e.py.)"""
from __future__ import annotations

import json
import os
import signal

import pytest

from cli_helpers import assert_all_gone, assert_pids_gone, start_cli, wait_for_workers, wait_until

GEN = ["-p", "The capital of France is", "-n", "2000", "-c", "4096", "--temp", "0", "--nproc-per-node", "2"]
START_S = 180    # generous: loading and the first steps on a loaded 2-core machine


def _last_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("tensorsplit:") and "fault:" not in ln]
    assert "Traceback" not in err, err
    return lines[-1] if lines else ""


@pytest.mark.parametrize("where", ["load", "step0"])
def test_sigkill_of_a_worker_during_load_or_prefill(smollm2_path, where):
    job = start_cli("generate", "-m", str(smollm2_path), *GEN, env={"TENSORSPLIT_FAULT": f"1:{where}:sleep60"})
    try:
        workers = wait_for_workers(job.pid, 2)
        # rank 1 is now paused inside its load (after its first tensor), or inside the first (prefill) step
        job.err.wait_for(f"tensorsplit: fault: rank 1 pausing at {where}\n", START_S)
        assert job.out.text() == ""                       # nothing generated yet
        os.kill(workers[1], signal.SIGKILL)
        code, err, took = job.finish(15)
    finally:
        job.kill()
    assert code == 1 and took < 15
    assert _last_line(err) == "tensorsplit: rank 1 failed: killed by SIGKILL", err
    assert_all_gone(job.pid)


def test_sigkill_of_the_coordinator(smollm2_path):
    job = start_cli("generate", "-m", str(smollm2_path), *GEN)
    try:
        job.out.wait_for(lambda s: len(s) > 0, START_S, "generated text")          # decoding
        os.kill(wait_for_workers(job.pid, 2)[0], signal.SIGKILL)
        code, err, took = job.finish(15)
    finally:
        job.kill()
    assert code == 1 and took < 15
    assert _last_line(err) == "tensorsplit: rank 0 failed: killed by SIGKILL", err
    assert_all_gone(job.pid)


def test_sigkill_of_the_launcher_ends_its_workers(smollm2_path):
    """README: workers die with the launcher (PR_SET_PDEATHSIG), so nothing is orphaned."""
    job = start_cli("generate", "-m", str(smollm2_path), *GEN)
    try:
        job.out.wait_for(lambda s: len(s) > 0, START_S, "generated text")          # decoding
        workers = wait_for_workers(job.pid, 2)
        os.kill(job.pid, signal.SIGKILL)
        job.proc.wait(timeout=15)
    finally:
        job.kill()
    assert job.proc.returncode == -signal.SIGKILL
    assert_pids_gone(workers.values())


def test_exception_inside_one_ranks_forward(smollm2_path):
    job = start_cli("generate", "-m", str(smollm2_path), *GEN, env={"TENSORSPLIT_FAULT": "1:step3:raise"})
    code, err, took = job.finish(START_S)
    assert code == 1
    assert _last_line(err) == "tensorsplit: rank 1 failed: InjectedFault: injected fault at step3 on rank 1", err
    assert_all_gone(job.pid)


def test_sigstopped_worker_inside_a_collective_times_out(smollm2_path):
    job = start_cli("generate", "-m", str(smollm2_path), *GEN, "--timeout", "5")
    try:
        job.out.wait_for(lambda s: len(s) > 0, START_S, "generated text")
        workers = wait_for_workers(job.pid, 2)
        os.kill(workers[1], signal.SIGSTOP)
        code, err, took = job.finish(30)   # 5 s collective timeout + reporting + SIGTERM/SIGKILL grace
    finally:
        job.kill()
    assert code == 1 and took < 30
    assert _last_line(err).startswith("tensorsplit: rank 1 failed: stopped responding"), err
    assert_all_gone(job.pid)


def test_sigterm_lets_rank_0_finish_the_step_in_flight(smollm2_path):
    """README: on SIGTERM rank 0 finishes the step in flight. Rank 0 pauses inside its fifth step (the
    step message already sent, rank 1 waiting in the step's first all-reduce); SIGTERM reaches the
    launcher during the pause. Rank 0 must complete that step (its forward and the logits gather,
    which need rank 1) before it stops: the fault hook says `finished step4` only after the gather.
    Then the usual graceful stop: `interrupted`, exit code 130, no rank blamed, nothing left."""
    job = start_cli("generate", "-m", str(smollm2_path), *GEN, env={"TENSORSPLIT_FAULT": "0:step4:sleep4"})
    try:
        job.err.wait_for("tensorsplit: fault: rank 0 pausing at step4\n", START_S)
        os.kill(job.pid, signal.SIGTERM)
        code, err, took = job.finish(60)
    finally:
        job.kill()
    assert code == 130, err
    lines = [ln for ln in err.splitlines() if ln.startswith("tensorsplit:")]
    assert lines[-2:] == ["tensorsplit: fault: rank 0 finished step4", "tensorsplit: interrupted"], err
    assert "failed" not in err and "Traceback" not in err, err
    assert_all_gone(job.pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_stops_batch_gracefully(smollm2_path, tmp_path, sig):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"Story number {i}:", "max_tokens": 4 + i % 5}) + "\n"
                               for i in range(40)))
    job = start_cli("batch", str(smollm2_path), str(prompts), "-o", str(out), "-np", "2", "--nproc-per-node", "2")
    try:
        wait_for_workers(job.pid, 2)
        wait_until(lambda: (out.exists() and out.read_text().count("\n") >= 2) or job.proc.poll() is not None,
                   START_S, "two finished lines")
        assert job.proc.poll() is None, job.err.text()
        os.kill(job.pid, sig)
        code, err, took = job.finish(20)
    finally:
        job.kill()
    assert code == 130 and took < 20, err
    assert "stopped:" in err and "rerun the same command to continue" in err
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]   # every line whole JSON
    assert 2 <= len(rows) < 40 and len({r["id"] for r in rows}) == len(rows)
    assert_all_gone(job.pid)

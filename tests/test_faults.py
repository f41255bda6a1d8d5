"""Faults end every process of the job within a bounded time, exit non-zero with one line naming the
rank and the cause, leave no orphans, and lose no finished output. Each has a hard deadline.
(SIGKILL of a worker during decode is in test_e2e.py.)"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from cli_helpers import assert_all_gone, start_cli, wait_for_workers

GEN = ["-p", "The capital of France is", "-n", "2000", "-c", "4096", "--temp", "0", "--nproc-per-node", "2"]


def _finish(proc, within: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=within)
    except Exception:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err, time.monotonic() - t0


def _last_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("tensorsplit:")]
    assert "Traceback" not in err, err
    return lines[-1] if lines else ""


@pytest.mark.parametrize("where", ["load", "step0"])
def test_sigkill_of_a_worker_during_load_or_prefill(smollm2_path, where):
    proc = start_cli("generate", "-m", str(smollm2_path), *GEN, env={"TENSORSPLIT_FAULT": f"1:{where}:sleep60"})
    workers = wait_for_workers(proc.pid, 2)
    time.sleep(4)   # rank 1 is now paused inside its load, or inside the first (prefill) step
    os.kill(workers[1], signal.SIGKILL)
    code, err, took = _finish(proc, 15)
    assert code != 0 and took < 15
    assert _last_line(err) == "tensorsplit: rank 1 failed: killed by SIGKILL", err
    assert_all_gone(proc.pid)


def test_sigkill_of_the_coordinator(smollm2_path):
    proc = start_cli("generate", "-m", str(smollm2_path), *GEN)
    assert proc.stdout.read(1)          # decoding
    os.kill(wait_for_workers(proc.pid, 2)[0], signal.SIGKILL)
    code, err, took = _finish(proc, 15)
    assert code != 0 and took < 15
    assert _last_line(err) == "tensorsplit: rank 0 failed: killed by SIGKILL", err
    assert_all_gone(proc.pid)


def test_exception_inside_one_ranks_forward(smollm2_path):
    proc = start_cli("generate", "-m", str(smollm2_path), *GEN, env={"TENSORSPLIT_FAULT": "1:step3:raise"})
    code, err, took = _finish(proc, 90)
    assert code == 1
    assert _last_line(err) == "tensorsplit: rank 1 failed: InjectedFault: injected fault at step3 on rank 1", err
    assert_all_gone(proc.pid)


def test_sigstopped_worker_inside_a_collective_times_out(smollm2_path):
    proc = start_cli("generate", "-m", str(smollm2_path), *GEN, "--timeout", "5")
    assert proc.stdout.read(1)
    workers = wait_for_workers(proc.pid, 2)
    os.kill(workers[1], signal.SIGSTOP)
    code, err, took = _finish(proc, 30)   # 5 s collective timeout + reporting + SIGTERM/SIGKILL grace
    assert code == 1 and took < 30
    assert _last_line(err).startswith("tensorsplit: rank 1 failed: stopped responding"), err
    assert_all_gone(proc.pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_stops_batch_gracefully(smollm2_path, tmp_path, sig):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"Story number {i}:", "max_tokens": 4 + i % 5}) + "\n"
                               for i in range(40)))
    proc = start_cli("batch", str(smollm2_path), str(prompts), "-o", str(out), "-np", "2", "--nproc-per-node", "2")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    code, err, took = _finish(proc, 20)
    assert code == 130 and took < 20, err
    assert "stopped:" in err and "rerun the same command to continue" in err
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]   # every line whole JSON
    assert 2 <= len(rows) < 40 and len({r["id"] for r in rows}) == len(rows)
    assert_all_gone(proc.pid)

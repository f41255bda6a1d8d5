"""`tensorsplit bench --profile`: where a decode step's time goes, per rank (worker/profile.py).

Times are reported, never asserted against a speed: the checks are the profile's shape, that its
parts account for the step (host time is the remainder, so the parts sum to each rank's step), and
that rank 0's step, timed inside the world, agrees within 5% with the step the bench timed on its own
clock around the loop."""
from __future__ import annotations

import json

import pytest

from cli_helpers import run_cli
from tensorsplit.worker.profile import COUNT, LENGTH, PARTS, STEP, Profiling, StepProfile, per_step_us


def test_host_time_is_what_no_part_holds_and_waits_come_out_of_the_all_reduce():
    waited = [1_000]
    p = StepProfile(wait_ns=lambda: waited[0])       # the path's cumulative wait counter, as shm reports it
    waited[0] = 1_300
    p.add("matmul", 5_000)
    p.add("all_reduce_work", 700)                    # the whole all-reduce call, wait included
    p.step(10_000)
    p.extend("sampling", 500)                        # after forward returned: the step grows
    v = p.vector()
    assert v.shape == (LENGTH,) and v[COUNT] == 1 and v[STEP] == 10_500
    parts = dict(zip(PARTS, v[:len(PARTS)].tolist()))
    assert parts["all_reduce_wait"] == 300 and parts["all_reduce_work"] == 400
    assert parts["host"] == 10_500 - 5_000 - 700 - 500
    assert sum(parts.values()) == v[STEP]
    p.reset()                                        # a new profile starts at the counter's value
    waited[0] = 1_400
    p.step(1_000)
    assert p.vector()[PARTS.index("all_reduce_wait")] == 100
    us = per_step_us(p.vector())
    assert us["steps"] == 1 and us["step_us"] == 1.0


def test_profiling_times_each_kernel_call_into_its_part():
    from tensorsplit.kernels.numerics import Numerics
    from tensorsplit.kernels.torch_kernels import TorchKernels
    import torch
    p = StepProfile()
    k = Profiling(TorchKernels(Numerics("exact"), "cpu"), p)
    x = torch.randn(3, 8)
    y = k.rms_norm(x, torch.ones(8), 1e-5)
    assert torch.equal(y, TorchKernels(Numerics("exact"), "cpu").rms_norm(x, torch.ones(8), 1e-5))
    k.activation("silu")(x)
    v = p.vector()
    assert v[PARTS.index("elementwise")] > 0
    assert all(v[PARTS.index(q)] == 0 for q in ("matmul", "attention", "get_rows"))


@pytest.mark.slow
def test_bench_profile_accounts_for_the_decode_step(smollm2_path):
    r = run_cli("bench", "-m", str(smollm2_path), "--profile", "--nproc-per-node", "1,2", "-p", "8", "-n", "8",
                "-r", "1")
    assert r.returncode == 0, r.stderr
    table, js = r.stdout[:r.stdout.index("\n{")], r.stdout[r.stdout.index("\n{"):]
    assert "decode step of world 1" in table and "decode step of world 2" in table and "| host |" in table
    doc = json.loads(js)
    for w in doc["worlds"]:
        prof = w["profile"]
        ranks = prof["ranks"]
        assert len(ranks) == w["world"]
        for i, rank in enumerate(ranks):
            parts = rank["parts_us"]
            assert set(parts) == set(PARTS) and rank["steps"] == 8
            assert abs(sum(parts.values()) - rank["step_us"]) < 1e-6 * rank["step_us"]
            assert parts["matmul"] > 0 and parts["attention"] > 0 and parts["elementwise"] > 0
            assert all(v >= 0 for k, v in parts.items() if k != "host")
            assert (parts["sampling"] > 0) == (i == 0)          # the coordinator samples; workers never
            assert (parts["all_reduce_work"] > 0) == (w["world"] > 1)
        # rank 0's step, timed inside the world, against the bench's own clock around the loop
        assert abs(ranks[0]["step_us"] - prof["measured_step_us"]) <= 0.05 * prof["measured_step_us"], prof

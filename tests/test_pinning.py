"""The workers of a node on cores of their own (worker/pinning.py), read back from /proc."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_helpers import ROOT, assert_all_gone, start_cli, workers_of
from tensorsplit.worker.pinning import parse_cpu_list, rank_cores, threads_affinity, usable_cores


def test_each_rank_gets_its_own_cores_or_none_when_there_are_too_few():
    cores = [0, 2, 4, 6, 1, 3, 5, 7]                 # as usable_cores orders them: first threads of each core
    assert [rank_cores(r, 2, 2, cores) for r in range(2)] == [[0, 2], [4, 6]]
    assert [rank_cores(r, 4, 2, cores) for r in range(4)] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert rank_cores(0, 3, 3, cores) is None       # 9 threads asked for on 8 cores: nobody is pinned
    assert parse_cpu_list("0-3,6") == {0, 1, 2, 3, 6} and parse_cpu_list("5") == {5}


def test_usable_cores_are_the_affinity_mask_one_per_physical_core_first():
    cores = usable_cores()
    assert sorted(cores) == sorted(__import__("os").sched_getaffinity(0)) and len(set(cores)) == len(cores)


def test_each_pool_thread_is_pinned_to_its_core():
    """In a fresh process with 2 torch threads: thread i of the pool runs on cores[i] only, as /proc says."""
    cores = usable_cores()
    if len(cores) < 2:
        pytest.skip("needs 2 usable cores")
    code = f"""
import json, os, torch
from tensorsplit import kernels
from tensorsplit.worker.pinning import pin, threads_affinity
assert kernels.native()
torch.set_num_threads(2)
got = pin({cores[:2]})
print(json.dumps({{"got": got, "tasks": {{str(k): sorted(v) for k, v in threads_affinity(os.getpid()).items()}},
                   "main": os.getpid()}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["got"] == cores[:2]                                   # each thread ran on its core after pinning
    masks = [tuple(m) for m in out["tasks"].values()]
    assert out["tasks"][str(out["main"])] == [cores[0]]               # the caller is pool thread 0
    assert (cores[1],) in masks


def test_two_workers_run_on_disjoint_cores(smollm2_path):
    cores = usable_cores()
    job = start_cli("generate", "-m", str(smollm2_path), "-p", "Once upon a time", "-n", "2000", "-c", "4096",
                    "--temp", "0", "--nproc-per-node", "2", "--threads", "1")
    try:
        job.out.wait_for(lambda s: len(s) > 0, 180, "generated text")
        workers = workers_of(job.pid)
        assert set(workers) == {0, 1}, workers
        masks = {r: threads_affinity(pid) for r, pid in workers.items()}
    finally:
        job.kill()
    assert_all_gone(job.pid)
    if len(cores) < 2:                                # too few cores to give each its own: nothing pinned
        assert all(m == set(cores) for r in masks for m in masks[r].values())
        return
    for r, pid in workers.items():
        mine = set(rank_cores(r, 2, 1, cores))
        assert masks[r][pid] == mine, (r, masks[r])                  # the rank's main (and only pool) thread
        assert all(m <= mine for m in masks[r].values()), (r, masks[r])
    assert not set().union(*masks[0].values()) & set().union(*masks[1].values())

"""README: nothing tensorsplit sends between processes is pickled. A test world where pickling and
torch.distributed's object collectives raise runs a generation, which must not notice.

The ban is installed in every Python process of the job (launcher and workers) by
tests/no_pickle/sitecustomize.py, put on PYTHONPATH for this test only: nothing of it ships. Each process
logs that the ban is in place, and every attempt to pickle is logged before it raises, so a caller
that swallowed the error is still caught.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cli_helpers import ROOT, run_cli

HOOK = Path(__file__).parent / "no_pickle"     # its sitecustomize.py


def _world_env(tmp_path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(HOOK), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "TS_NO_PICKLE_LOG": str(tmp_path / "pickle.log")}


def test_the_ban_is_in_force(tmp_path):
    """In a process started as the job's are, pickling and an object collective both raise, and are logged."""
    env = _world_env(tmp_path)
    code = """if True:
        import pickle, torch.distributed as dist
        for f in (lambda: pickle.dumps(1), lambda: dist.broadcast_object_list([1]),
                  lambda: dist.distributed_c10d.all_gather_object([None], 1)):
            try:
                f()
            except RuntimeError as e:
                print(e)
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "pickle.dumps: pickling is forbidden in this test world",
        "torch.distributed.broadcast_object_list: pickling is forbidden in this test world",
        "torch.distributed.all_gather_object: pickling is forbidden in this test world"]
    log = (tmp_path / "pickle.log").read_text().splitlines()
    assert log[0].startswith("installed in pid") and sum(ln.startswith("CALLED") for ln in log) == 3


def test_a_generation_pickles_nothing(smollm2_path, tmp_path):
    env = _world_env(tmp_path)
    r = run_cli("generate", "-m", str(smollm2_path), "-p", "The capital of France is", "-n", "6", "--temp", "0",
                "--json", "--nproc-per-node", "2", env=env)
    log = (tmp_path / "pickle.log").read_text().splitlines()
    assert not [ln for ln in log if ln.startswith("CALLED")], "\n".join(log)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["completion_tokens"] == 6
    installed = [ln for ln in log if ln.startswith("installed")]
    workers = [ln for ln in installed if ln.rstrip().endswith("-m tensorsplit.worker")]
    assert len(workers) == 2 and len(installed) >= 3, "\n".join(log)     # both ranks and the launcher

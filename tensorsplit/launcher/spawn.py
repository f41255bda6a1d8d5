"""Start one worker process per device on this node, watch them, and end them together.

torchrun-style: every worker gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR
and MASTER_PORT, runs `python -m tensorsplit.worker`, and reads the world's plan (WorldPlan) as JSON from
its environment; rank 0 also gets the job, in a file only it is told of (workers never see text).
When the launching process is rank 0 itself (LLM, serve), the launcher starts the other ranks and
watches them from a thread, telling the caller of the first failure.

If any worker dies or raises, the others are ended within seconds and the launcher exits 1
with one line naming the rank that failed first and why. Workers run in their own sessions so
that Ctrl-C reaches only the launcher, which asks rank 0 (the coordinator) to stop gracefully
and then ends everyone; workers also die with the launcher (PR_SET_PDEATHSIG), so nothing is
orphaned even if the launcher is killed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import threading
from pathlib import Path
from typing import Callable

from ..comm.shm import remove_job_segments
from ..spec import JOB_ENV, WORLD_ENV, NodeSpec
from ..devices import visible_gpus
from ..plan import WorldPlan
from ..messages import say

POLL_S = 0.05
FAILURE_WINDOW_S = 1.0   # after a first failure, how long to let the others report theirs
GRACE_S = 3.0            # SIGTERM -> SIGKILL
STOP_GRACE_S = 10.0      # Ctrl-C: time rank 0 gets to finish what it was writing


def free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def native_kernels_env() -> dict[str, str]:
    """Build the native CPU kernels here, once, before the workers start (they load the built library
    instead of racing to compile it). If they cannot be built, the reason was printed once here and the
    workers are told to use the torch path without trying again."""
    from ..kernels import native
    return {} if native() else {"TENSORSPLIT_NATIVE": "0"}


def worker_env(node: NodeSpec, local_rank: int, port: int, error_file: str, gpus: list[str], threads: int
               ) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RANK": str(node.node_rank * node.nproc + local_rank),
        "WORLD_SIZE": str(node.world),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(node.nproc),
        "MASTER_ADDR": node.master_addr,
        "MASTER_PORT": str(port),
        "TENSORSPLIT_LAUNCHER_PID": str(os.getpid()),
        "TENSORSPLIT_ERROR_FILE": error_file,
        "TENSORSPLIT_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    })
    if node.pin_gpus and gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[local_rank % len(gpus)]
    return env


class Launch:
    """The running workers of this node."""

    def __init__(self, plan: WorldPlan, node: NodeSpec, job=None, rank0_here: bool = False):
        """job: what rank 0 runs (coordinator/jobs.py), given to it alone. rank0_here: the calling
        process is rank 0 (LLM, serve): start only the other ranks of this node."""
        from ..coordinator.jobs import job_to_json
        self.node, self.rank0_here = node, rank0_here and node.node_rank == 0
        self.port = node.master_port or free_port(node.master_addr)
        self.tmp = tempfile.TemporaryDirectory(prefix="tensorsplit-")
        gpus = visible_gpus() if node.pin_gpus else []
        first = 1 if self.rank0_here else 0
        self.local_ranks = list(range(first, node.nproc))
        self.error_files = [str(Path(self.tmp.name) / f"rank{self.rank_of(i)}.json") for i in self.local_ranks]
        extra = {**native_kernels_env(), WORLD_ENV: plan.to_json()}
        job_file = None
        if job is not None and node.node_rank == 0 and not self.rank0_here:
            job_file = Path(self.tmp.name) / "job.json"        # the temporary folder is the user's alone
            job_file.write_text(job_to_json(job), encoding="utf-8")
        self.procs: list[subprocess.Popen] = []
        for k, i in enumerate(self.local_ranks):
            threads = plan.ranks[self.rank_of(i)].threads
            env = {**worker_env(node, i, self.port, self.error_files[k], gpus, threads), **extra}
            if self.rank_of(i) == 0 and job_file is not None:
                env[JOB_ENV] = str(job_file)
            self.procs.append(subprocess.Popen([sys.executable, "-m", "tensorsplit.worker"], env=env,
                                               start_new_session=True))
        self.stop_requested = False
        self.failure: str | None = None      # set by watch_from_thread

    def rank_of(self, i: int) -> int:
        """The world rank of local rank i."""
        return self.node.node_rank * self.node.nproc + i

    def watch_from_thread(self, on_failure: Callable[[str], None]) -> None:
        """Rank 0 lives in the calling process (LLM, serve): watch the other ranks from a daemon
        thread; on the first failure end them all and call on_failure(one line naming the rank)."""
        def run() -> None:
            while not self.stop_requested:
                codes = [p.poll() for p in self.procs]
                failed = [k for k, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    self.failure = self._blame(failed)
                    self._kill_all()
                    on_failure(self.failure)
                    return
                if codes and all(c == 0 for c in codes):
                    return
                time.sleep(POLL_S)
        threading.Thread(target=run, name="tensorsplit-launcher-watch", daemon=True).start()

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """After rank 0 (this process) shut the world down: let the workers exit, end any that do not."""
        self.stop_requested = True
        self._reap_after(grace_s)
        self._kill_all()
        remove_job_segments(str(os.getpid()))
        self.tmp.cleanup()

    def wait(self) -> int:
        """Watch the workers until all have exited; end them all on the first failure. Exit code."""
        previous = {s: signal.signal(s, self._on_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._watch()
        finally:
            self._kill_all()
            remove_job_segments(str(os.getpid()))    # a shared-memory name a crash left behind
            for s, h in previous.items():
                signal.signal(s, h)
            self.tmp.cleanup()

    def _on_stop(self, signum, frame):
        if self.stop_requested:      # a second Ctrl-C: stop now
            self._kill_all()
            raise KeyboardInterrupt
        self.stop_requested = True
        self._signal(0, signal.SIGTERM)   # rank 0 (the coordinator) finishes its line and shuts the world down

    def _watch(self) -> int:
        stop_deadline = None
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed and not self.stop_requested:
                return self._fail(failed)
            if all(c is not None for c in codes):
                return 130 if self.stop_requested else 0
            if codes[0] == 0 and self.node.node_rank == 0:
                # the coordinator is done; the workers got their shutdown and should follow at once
                self._reap_after(STOP_GRACE_S)
                return 130 if self.stop_requested else 0
            if self.stop_requested:
                stop_deadline = stop_deadline or time.monotonic() + STOP_GRACE_S
                if time.monotonic() > stop_deadline:
                    return 130
            time.sleep(POLL_S)

    def _fail(self, failed: list[int]) -> int:
        say(f"{self._blame(failed)}")
        return 1

    def _blame(self, failed: list[int]) -> str:
        """One line naming the rank that failed first and why, after letting the others report."""
        deadline = time.monotonic() + FAILURE_WINDOW_S
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(POLL_S)
        codes = [p.poll() for p in self.procs]
        reports = [self._read_report(i) for i in range(len(self.procs))]
        primary = [i for i, c in enumerate(codes) if c not in (None, 0) and not (reports[i] or {}).get("secondary")]
        if primary:
            i = min(primary, key=lambda k: (0 if codes[k] < 0 else 1, k))   # killed by a signal first
            cause = reports[i]["message"] if reports[i] else _signal_cause(codes[i])
        else:
            alive = [i for i, c in enumerate(codes) if c is None]
            if alive:
                i = alive[0]
                seen = reports[failed[0]]["message"] if reports[failed[0]] else _signal_cause(codes[failed[0]])
                cause = f"stopped responding (rank {self.rank_of(self.local_ranks[failed[0]])}: {seen})"
            else:
                i = failed[0]
                cause = reports[i]["message"] if reports[i] else _signal_cause(codes[i])
        return f"rank {self.rank_of(self.local_ranks[i])} failed: {cause}"

    def _read_report(self, i: int) -> dict | None:
        try:
            with open(self.error_files[i]) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _signal(self, i: int, sig: int) -> None:
        p = self.procs[i]
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass

    def _reap_after(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(POLL_S)

    def _kill_all(self) -> None:
        for i in range(len(self.procs)):
            self._signal(i, signal.SIGTERM)
        self._reap_after(GRACE_S)
        for i in range(len(self.procs)):
            self._signal(i, signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _signal_cause(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def launch(plan: WorldPlan, node: NodeSpec, job) -> int:
    """Run this node's ranks of the world (rank 0 runs `job`), watch them; the exit code."""
    return Launch(plan, node, job).wait()

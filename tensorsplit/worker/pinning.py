"""Which cores a worker's threads run on: the one place that decides it.

The workers of a node share its cores. Left to the scheduler, a rank's threads wander onto the cores
of another rank; a rank spinning in an all-reduce then holds the core its peer needs, and every
thread loses its caches when it moves. So by default each worker takes its own `threads` cores,
disjoint from the other workers of its node: local rank r gets the cores r * threads ..
(r + 1) * threads - 1 of the ones this process may use (its affinity mask: taskset, cgroups), one
per physical core before any second hyperthread of a core. Each of its threads is then pinned to one
of those cores, thread i to the i-th (the native library runs that inside torch's thread pool).

Nothing is pinned when the node's workers ask for more threads than there are cores (--threads was
raised on purpose, or the ranks of several worlds share a machine), or with --no-pin-cores.
"""
from __future__ import annotations

import os
from pathlib import Path


def usable_cores() -> list[int]:
    """The CPUs this process may run on, one per physical core first (by core, then by sibling)."""
    allowed = sorted(os.sched_getaffinity(0))
    firsts, seconds = [], []
    seen: set[str] = set()
    for cpu in allowed:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            siblings = str(cpu)
        (seconds if siblings in seen else firsts).append(cpu)
        seen.add(siblings)
    return firsts + seconds


def rank_cores(local_rank: int, local_world: int, threads: int, cores: list[int] | None = None) -> list[int] | None:
    """The cores of local rank `local_rank` (one per thread), or None when the node's workers want more
    threads than it has cores and so cannot have cores of their own."""
    cores = usable_cores() if cores is None else cores
    if local_world * threads > len(cores):
        return None
    return cores[local_rank * threads:(local_rank + 1) * threads]


def pin(cores: list[int]) -> list[int]:
    """Pin this process's threads to `cores`: the calling thread (and the threads it starts from now
    on) to the whole set, then, with the native library, torch's pool thread i to cores[i]. Returns the
    CPU each pool thread reported after pinning (empty without the native library)."""
    os.sched_setaffinity(0, cores)
    from ..kernels import native
    if not native(announce=False):
        return []
    import torch
    return list(torch.ops.tensorsplit.pin_threads.default(cores))


def restore_affinity(cpus: set[int]) -> None:
    """Every thread of this process back on `cpus`: a world whose rank 0 ran in a caller's process (LLM,
    serve) gives the caller its cores back on close, or its next world (and every process it starts,
    which inherits the mask) would run on rank 0's cores only."""
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except OSError:          # a thread that ended meanwhile
            pass


def threads_affinity(pid: int) -> dict[int, set[int]]:
    """thread id -> the CPUs it may run on, from /proc (for tests and reports)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out[int(task.name)] = parse_cpu_list(line.split(":", 1)[1].strip())
    return out


def parse_cpu_list(text: str) -> set[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6}"""
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus

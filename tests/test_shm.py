"""The shared-memory collectives of a node's CPU ranks (comm/shm.py, kernels/csrc/shm.cpp), in real
processes: sums against float64, the same bits on every rank, many back-to-back calls of changing
sizes, and what a dead or stopped peer does to the others. (End-to-end worlds that use them are in
test_e2e.py and test_faults.py.)"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import signal
import socket
import time

import numpy as np
import pytest
import torch

from tensorsplit import kernels

SIZES = (1, 7, 4096, 1_048_577)       # 1_048_577 floats span 4 slots of 1 MiB: chunked
CTX = mp.get_context("spawn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(port: int) -> str:
    """The job id the test's ranks name their segment by (comm/shm.py job_id: the launcher's pid in a
    real run), so that the test looks at its own names only, not at other jobs on this host. The port
    is the test's own (a free one it picked), so the name is its own too."""
    return f"test{port}"


def _own_segments(port: int) -> list[str]:
    from tensorsplit.comm.shm import PREFIX
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"{PREFIX}{_job(port)}-")]


def _segment(rank: int, world: int, port: int, timeout_s: float = 20.0):
    import torch.distributed as dist

    from tensorsplit import kernels as k
    from tensorsplit.comm.shm import HostSegment
    assert k.native(announce=False)
    os.environ["TENSORSPLIT_LAUNCHER_PID"] = _job(port)
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, datetime.timedelta(seconds=30))
    return HostSegment.open(store, rank, rank, world, timeout_s), store


def _inputs(rank: int, size: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(size * 31 + rank).standard_normal(size).astype(np.float32))


def _sums(rank, world, port, queue):
    seg, _ = _segment(rank, world, port)
    out = {}
    for size in SIZES:
        x = _inputs(rank, size)
        seg.all_reduce(x)
        out[size] = x.numpy().tobytes()
    # 10,000 back-to-back calls with changing sizes (every rank the same sequence)
    rng = np.random.default_rng(7)
    check = 0.0
    for i in range(10_000):
        n = int(rng.integers(1, 3000))
        x = torch.full((n,), float(rank + 1))
        seg.all_reduce(x)
        check += float(x[0]) - world * (world + 1) / 2
    t = torch.tensor([rank * 10 + 1, 2, 3], dtype=torch.int64)
    seg.broadcast(t, 0)
    gathered = seg.gather(torch.full((3, 5), float(rank)), 0)
    queue.put((rank, out, check, t.tolist(), gathered.tolist()))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_all_reduce_is_exact_identical_and_does_not_deadlock(world):
    if not kernels.native():
        pytest.fail("the native kernels did not build")
    port, queue = _free_port(), CTX.Queue()
    procs = [CTX.Process(target=_sums, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=600) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for size in SIZES:
        bits = {r[1][size] for r in results}
        assert len(bits) == 1, f"size {size}: ranks disagree"
        got = np.frombuffer(results[0][1][size], dtype=np.float32).astype(np.float64)
        parts = [_inputs(r, size).numpy().astype(np.float64) for r in range(world)]
        ref = np.sum(parts, axis=0)
        # float32 summation of `world` terms: at most (world - 1) roundings of the running sum
        bound = (world - 1) * 2.0 ** -24 * np.sum(np.abs(parts), axis=0) + 1e-45
        assert np.all(np.abs(got - ref) <= bound), f"size {size}: {np.abs(got - ref).max()}"
    for rank, _, check, bcast, gathered in results:
        assert check == 0.0
        assert bcast == [1, 2, 3]
        assert gathered == ([[[float(r)] * 5] * 3 for r in range(world)] if rank == 0 else [])
    assert not _own_segments(port)


def _victim_waits(rank, world, port, queue, stop_at):
    seg, _ = _segment(rank, world, port, timeout_s=4.0)
    x = torch.ones(100)
    for i in range(10**9):
        if rank == 1 and i == stop_at:
            queue.put(("paused", os.getpid()))
            time.sleep(3600)
        t0 = time.monotonic()
        try:
            seg.all_reduce(x)
        except Exception as e:  # noqa: BLE001 - reported to the test
            queue.put(("error", rank, str(e), time.monotonic() - t0))
            return


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_stopped_peer_ends_the_wait(how):
    """Rank 1 stops taking part mid-stream; rank 0, spinning in an all-reduce, fails with one line naming
    rank 1: at once when rank 1 was killed, after the timeout (4 s) when it was stopped."""
    if not kernels.native():
        pytest.fail("the native kernels did not build")
    port, queue = _free_port(), CTX.Queue()
    procs = [CTX.Process(target=_victim_waits, args=(r, 2, port, queue, 50)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        kind, pid = queue.get(timeout=120)
        assert kind == "paused"
        time.sleep(0.5)                     # rank 0 is spinning in its all-reduce by now
        os.kill(pid, getattr(signal, how))
        kind, rank, message, waited = queue.get(timeout=30)
        assert kind == "error" and rank == 0
        assert "rank(s) 1" in message or "rank 1" in message, message
        if how == "SIGKILL":
            assert "exited" in message and waited < 4.0, (message, waited)
        else:
            assert "Timed out after 4 s" in message, message
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=30)
    assert not _own_segments(port)


def test_segments_are_private_and_the_launcher_removes_leftovers():
    """A segment is created with mode 0600 under an unguessable name, and its name is unlinked as soon as
    every local rank has mapped it; a name a crash left behind (between creating and unlinking) is
    removed by the launcher's remove_job_segments, which touches only its own job's names."""
    import stat
    from tensorsplit.comm.shm import PREFIX, remove_job_segments
    if not kernels.native():
        pytest.fail("the native kernels did not build")
    ops = torch.ops.tensorsplit
    name = f"/{PREFIX}test{os.getpid()}-n0-0123456789abcdef"
    ops.shm_attach(name, True, 0, 2, 1 << 16)
    try:
        mode = stat.S_IMODE(os.stat(f"/dev/shm{name}").st_mode)
        assert mode == 0o600, oct(mode)
        other = f"/dev/shm/{PREFIX}other{os.getpid()}-n0-x"
        open(other, "w").close()
        remove_job_segments(f"test{os.getpid()}")
        assert not os.path.exists(f"/dev/shm{name}") and os.path.exists(other)
    finally:
        ops.shm_unlink(name)
        if os.path.exists(other):
            os.unlink(other)
    open(other, "w").close()                                        # a name that exists already:
    try:                                                            # O_EXCL never adopts it
        with pytest.raises(RuntimeError, match="cannot create"):
            ops.shm_attach(other.removeprefix("/dev/shm"), True, 0, 2, 1 << 16)
    finally:
        os.unlink(other)

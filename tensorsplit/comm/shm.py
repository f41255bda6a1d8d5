"""The shared-memory segment of the CPU ranks of one node: all-reduce, broadcast and gather in a few
microseconds instead of Gloo's round trips over loopback (kernels/csrc/shm.cpp has the protocol).

Life of a segment (one per node and world):
  - the node's local rank 0 creates it with mode 0600 under an unguessable name
    (/dev/shm/tensorsplit-<job>-n<node>-<128 random bits>) and posts the name in the rendezvous store;
  - the node's other ranks read the name from the store and map it;
  - once every local rank has mapped it, local rank 0 unlinks the name: the memory lives on in the
    mappings and disappears with the last process, whatever ends it (exit, Ctrl-C, SIGKILL).
  - <job> is the launcher's pid, so the launcher can remove a name left by a crash between creating
    and unlinking (remove_job_segments).
Waits give up after the world's --timeout, naming the ranks they waited for, and fail at once when a
rank they wait for has exited.
"""
from __future__ import annotations

import glob
import os
import re
import secrets
import time

import torch

from ..errors import TensorsplitError, collective_call

SLOT_BYTES = 1 << 20          # per rank and buffer: messages larger than this go through in chunks
PREFIX = "tensorsplit-"
POLL_S = 0.01


def job_id() -> str:
    return os.environ.get("TENSORSPLIT_LAUNCHER_PID") or os.environ.get("TORCHELASTIC_RUN_ID", "").replace("-", "") \
        or str(os.getpid())


def remove_job_segments(job: str) -> None:
    """Unlink every segment name of this job still in /dev/shm (normally none: names are unlinked as
    soon as every rank has mapped the segment)."""
    for path in glob.glob(f"/dev/shm/{PREFIX}{job}-*"):
        try:
            os.unlink(path)
        except OSError:
            pass


class HostSegment:
    def __init__(self, handle: int, rank: int, node: int, local_rank: int, local_world: int, timeout_s: float):
        self.handle, self.rank, self.node, self.local_rank, self.local_world = handle, rank, node, local_rank, local_world
        self.timeout_s = timeout_s
        self.ops = torch.ops.tensorsplit

    @staticmethod
    def open(store, rank: int, local_rank: int, local_world: int, timeout_s: float) -> "HostSegment":
        """Create (local rank 0) or map the node's segment; every local rank must call this."""
        ops = torch.ops.tensorsplit
        node = rank // local_world
        key = f"ts/shm/{node}"
        name = None
        try:
            if local_rank == 0:
                name = f"/{PREFIX}{job_id()}-n{node}-{secrets.token_hex(16)}"
                handle = ops.shm_attach(name, True, 0, local_world, SLOT_BYTES)
                store.set(key, name)
            else:
                handle = ops.shm_attach(store.get(key).decode(), False, local_rank, local_world, SLOT_BYTES)
            store.add(key + "/mapped", 1)
            if local_rank == 0:                 # every local rank has it mapped: the name can go
                deadline = time.monotonic() + timeout_s
                while store.add(key + "/mapped", 0) < local_world:
                    if time.monotonic() > deadline:
                        raise TensorsplitError(f"rank {rank}: not every rank of node {node} mapped the shared "
                                               f"memory segment within {timeout_s:g} s")
                    time.sleep(POLL_S)
        finally:
            if name is not None:
                ops.shm_unlink(name)
        return HostSegment(handle, rank, node, local_rank, local_world, timeout_s)

    def _ranks(self, message: str) -> str:
        """The op names local ranks; say which ranks of the world they are."""
        m = re.search(r"local rank\(s\) ([\d, ]+)|local rank (\d+)", message)
        if not m:
            return message.removeprefix("shm: ")
        local = [int(r) for r in (m.group(1) or m.group(2)).split(",")]
        world = ", ".join(str(self.node * self.local_world + r) for r in local)
        return re.sub(r"local rank\(s\) [\d, ]+|local rank \d+", f"rank(s) {world}", message).removeprefix("shm: ")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum float32 x over the node's ranks in place; every rank gets the same bits."""
        return collective_call(self._ranks, self.ops.shm_all_reduce.default, x, self.handle, self.timeout_s)

    def broadcast(self, x: torch.Tensor, root: int = 0, idle: bool = False) -> torch.Tensor:
        """Copy local rank `root`'s x into every rank's x (same shape and dtype everywhere)."""
        return collective_call(self._ranks, self.ops.shm_broadcast.default, x, self.handle, root, self.timeout_s, idle)

    def wait_ns(self) -> int:
        """Nanoseconds this rank's all-reduces have spent waiting for the node's other ranks, so far."""
        return int(self.ops.shm_wait_ns.default(self.handle))

    def gather(self, x: torch.Tensor, root: int = 0) -> torch.Tensor:
        """(local_world, *x.shape) on local rank `root`; an empty tensor elsewhere."""
        return collective_call(self._ranks, self.ops.shm_gather.default,
                               x.contiguous(), self.handle, root, self.timeout_s)

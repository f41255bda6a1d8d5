"""The one group object of a world: rank, world size, the device group and a CPU control group.

- `device_group` carries the data path: the two all-reduces per layer, the embedding's
  all-reduce and the logits gather. Its timeout bounds every collective (a stopped or
  wedged rank makes the others fail instead of wait forever).
- `control_group` (always Gloo, on host memory) carries the coordinator's step messages to
  the workers. Workers wait on it while the coordinator is idle (a person typing in chat), so
  its timeout is long; a dead coordinator still ends the wait at once (the socket closes).
- `host`: when every rank is on a CPU (and the native library is loaded), the ranks of a node
  share a memory segment (shm.py) that carries the all-reduces, and on a single node also the step
  messages and the logits gather, in microseconds.
- `wire`: across nodes of CPU ranks, the nodes' leaders (local rank 0) hold one TCP connection per
  pair of nodes (wire.py). An all-reduce is hierarchical: summed inside each node, exchanged between
  the leaders and summed in node order, and shared inside each node again, so every rank ends with
  the same bits. The step messages and the logits gather take the same two hops.
  `--wire-transport gloo` puts the leaders' all-reduce on `leader_group` (Gloo) instead, and the
  rest on the world's groups.
Only fixed-dtype tensors cross the wire: no pickling, no object collectives.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .backend import BackendChoice
from .netif import gloo_interface_for
from .watchdog import CollectiveWatchdog
from .rendezvous import agree, open_store
from .shm import HostSegment
from .wire import WireMesh

CONTROL_TIMEOUT_S = 7 * 24 * 3600


@dataclass
class CommGroup:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: BackendChoice
    device_group: object | None = None   # torch ProcessGroup; None for a world of one
    control_group: object | None = None
    watchdog: CollectiveWatchdog | None = None
    host: HostSegment | None = None      # this node's shared-memory segment (all-CPU worlds)
    leader_group: object | None = None   # local rank 0 of every node, when the world spans nodes (gloo transport)
    wire: WireMesh | None = None         # on each node's leader, when the world spans nodes (tcp transport)
    wired: bool = False                  # on every rank: the nodes talk over the leaders' wire
    single_node: bool = True
    n_nodes: int = 1

    @property
    def leader(self) -> bool:
        """Whether this rank speaks for its node between nodes (its local rank 0)."""
        return self.host is None or self.host.local_rank == 0

    # -- data path ---------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over ranks. Returns the summed tensor (x itself, modified, on the direct path)."""
        if self.world == 1:
            return x
        if self.host is not None or self.wired:
            if self.host is not None:
                self.host.all_reduce(x)                          # the node's sum, the same bits on each rank
            if self.n_nodes > 1 and self.leader:
                if self.wired:
                    self.wire.all_reduce(x)                      # the nodes' sums, added in node order
                else:
                    with self.watchdog.watch("all_reduce between nodes"):
                        dist.all_reduce(x, group=self.leader_group)
            if self.host is not None and self.n_nodes > 1:
                self.host.broadcast(x, 0)
            return x
        with self.watchdog.watch("all_reduce"):
            if self.backend.staging and x.device.type != "cpu":
                host = x.cpu()
                dist.all_reduce(host, group=self.device_group)
                return host.to(x.device)
            dist.all_reduce(x, group=self.device_group)
        return x

    def gather_logits(self, local: torch.Tensor, vocab_sizes: list[int]) -> torch.Tensor | None:
        """local (m, local_vocab) -> on rank 0 the full (m, sum(vocab_sizes)) float32 on the CPU; None elsewhere.

        Slices differ in width for uneven splits, so each is padded to the widest and cut after."""
        if self.world == 1:
            return local.float().cpu()
        width = max(vocab_sizes)
        padded = torch.zeros(local.shape[0], width, dtype=torch.float32, device=local.device)
        padded[:, : local.shape[1]] = local
        if self.backend.staging:
            padded = padded.cpu()
        if self.host is not None and self.single_node or self.wired:
            parts = self._gather_cpu(padded)                     # (world, m, width) on rank 0
            return torch.cat([p[:, :n] for p, n in zip(parts, vocab_sizes)], dim=1) if self.rank == 0 else None
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        with self.watchdog.watch("the logits gather"):
            dist.gather(padded, parts, dst=0, group=self.device_group)
        if self.rank != 0:
            return None
        return torch.cat([p[:, :n].cpu() for p, n in zip(parts, vocab_sizes)], dim=1)

    def _gather_cpu(self, x: torch.Tensor) -> torch.Tensor | None:
        """x from every rank -> (world, *x.shape) on rank 0, None elsewhere: inside each node through
        shared memory, then between the leaders over the wire (ranks are numbered node by node)."""
        parts = self.host.gather(x, 0) if self.host is not None else x[None]     # (local_world, ...) on leaders
        if self.wired and self.leader:
            parts = self.wire.gather(parts, 0)                                   # (n_nodes, local_world, ...)
        return parts.reshape(self.world, *x.shape) if self.rank == 0 else None

    def all_reduce_wait_ns(self):
        """() -> nanoseconds this rank's all-reduces have waited so far: for the node's other ranks to post
        their parts (shared memory) and, on a node's leader, for the exchange with the other nodes (the
        wire: the link's time included); None where the path reports neither (Gloo)."""
        sources = [f for f in (self.host.wait_ns if self.host is not None else None,
                               self.wire.wait_ns if self.wire is not None else None) if f is not None]
        return (lambda: sum(f() for f in sources)) if sources else None

    def gather_stats(self, v: torch.Tensor) -> torch.Tensor | None:
        """v (k,) float64 on the CPU, from every rank -> (world, k) on rank 0; None elsewhere."""
        if self.world == 1:
            return v[None]
        if self.host is not None and self.single_node or self.wired:
            return self._gather_cpu(v)
        parts = [torch.empty_like(v) for _ in range(self.world)] if self.rank == 0 else None
        with self.watchdog.watch("a profile gather"):
            dist.gather(v, parts, dst=0, group=self.control_group)
        return torch.stack(parts) if self.rank == 0 else None

    def path_name(self) -> str:
        """How all_reduce travels, for reports."""
        if self.world == 1:
            return "none (one rank)"
        fmt = {0: "", 1: ", bf16", 2: ", q8_0 blocks"}[self.wire.format if self.wire is not None else 0]
        between = f"{'TCP wire' if self.wired else 'Gloo'}{fmt} between {self.n_nodes} nodes"
        if self.host is None:
            if self.wired:
                return between
            return self.backend.name + (" staged through host memory" if self.backend.staging else "")
        if self.n_nodes == 1:
            return f"shared memory ({self.host.local_world} ranks on one node)"
        return f"shared memory inside each node ({self.host.local_world} ranks), {between}"

    def time_all_reduce(self, n_elems: int, iters: int, path: str, dtype=torch.float64) -> float:
        """Seconds per all-reduce of n_elems values (float64: what the row-parallel layers send), averaged
        over iters calls after a warm-up; path "auto" is all_reduce, "gloo" plain Gloo on the device group,
        and "exchange", "doubling" or "all_gather" that algorithm over it (gloo_algorithms.py).
        Every rank must call it with the same arguments."""
        import time

        from . import gloo_algorithms
        x = torch.ones(n_elems, dtype=dtype, device=self.device)
        def once():
            if path in gloo_algorithms.ALGORITHMS:
                with self.watchdog.watch(f"all_reduce ({path})"):
                    gloo_algorithms.run(path, x, self.device_group, self.rank, self.world)
            elif path == "gloo":
                with self.watchdog.watch("all_reduce"):
                    dist.all_reduce(x, group=self.device_group)
            else:
                self.all_reduce(x)
        for _ in range(max(3, iters // 10)):
            once()
        self.barrier_control("the all-reduce benchmark", 60.0)
        t0 = time.perf_counter()
        for _ in range(iters):
            once()
        return (time.perf_counter() - t0) / iters

    # -- control path ------------------------------------------------------------------------
    def broadcast_control(self, t: torch.Tensor, idle: bool = False) -> torch.Tensor:
        """Broadcast an int64 CPU tensor from rank 0 (the coordinator) to every rank, in place.
        idle: a worker waiting for the next step, however long the coordinator takes (not timed)."""
        assert t.dtype == torch.int64 and t.device.type == "cpu", (t.dtype, t.device)
        if self.host is not None and self.single_node:
            return self.host.broadcast(t, 0, idle)
        if self.wired:
            if self.leader:
                self.wire.broadcast(t, 0, idle)                  # node 0's leader (rank 0) to every leader
            if self.host is not None:
                self.host.broadcast(t, 0, idle)                  # each leader to its node
            return t
        if self.world > 1:
            if idle:
                dist.broadcast(t, src=0, group=self.control_group)
            else:
                with self.watchdog.watch("a step message broadcast"):
                    dist.broadcast(t, src=0, group=self.control_group)
        return t

    def barrier_control(self, what: str, timeout_s: float) -> None:
        """Wait for every rank on the control group, for at most timeout_s (e.g. all shards loaded)."""
        if self.world > 1:
            with self.watchdog.watch(what, timeout_s):
                dist.barrier(group=self.control_group)

    def close(self) -> None:
        if self.wire is not None:
            self.wire.close()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_comm(rank: int, world: int, local_rank: int, device: torch.device, backend: BackendChoice,
              master_addr: str, master_port: int, timeout_s: float, identity: dict | None = None,
              local_world: int = 1, on_timeout=None, shared_memory: bool = True,
              wire_transport: str = "tcp", wire: str = "f32") -> CommGroup:
    """Join the world: the store at master_addr:master_port (rank 0 serves it), agreement, both groups,
    and for CPU ranks the node's shared-memory segment (shared_memory=False: Gloo only, for comparison)
    and, across nodes, the leaders' wire (wire_transport "tcp"; "gloo": the leaders' Gloo group), whose
    all-reduces send each node's part as `wire` says (f32: as it is; bf16; q8: q8_0 blocks)."""
    group = CommGroup(rank, world, local_rank, device, backend)
    if world == 1:
        return group
    if backend.name == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
        iface = gloo_interface_for(master_addr)
        if iface:
            os.environ["GLOO_SOCKET_IFNAME"] = iface
    store = open_store(rank, master_addr, master_port, timeout_s)
    agree(store, rank, world, identity or {}, timeout_s, local_world)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {}
    if device.type in ("cuda", "xpu") and not backend.staging:
        kwargs["device_id"] = device  # create communicators eagerly, so the first collective obeys the timeout
    dist.init_process_group(backend.name, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
    group.device_group = dist.group.WORLD
    group.control_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT_S))
    group.watchdog = CollectiveWatchdog(timeout_s, on_timeout)
    if shared_memory and backend.name == "gloo" and not backend.staging and device.type == "cpu":
        _open_host_segment(group, store, local_world, timeout_s, master_addr, wire_transport, wire)
    return group


def _open_host_segment(group: CommGroup, store, local_world: int, timeout_s: float, master_addr: str,
                       wire_transport: str, wire: str) -> None:
    """Every rank calls this (new_group is collective). Nodes hold local_world consecutive ranks."""
    from ..kernels import native
    nnodes = group.world // local_world
    group.single_node = nnodes == 1
    if not native(announce=False) or group.world % local_world or group.rank % local_world != group.local_rank:
        return                         # no native library, or ranks not laid out node by node: Gloo only
    group.n_nodes = nnodes
    if local_world > 1:
        group.host = HostSegment.open(store, group.rank, group.local_rank, local_world, timeout_s)
    if nnodes == 1:
        return
    if wire_transport == "tcp":
        group.wired = True
        if group.local_rank == 0:
            group.wire = WireMesh.open(store, group.rank // local_world, nnodes, master_addr, timeout_s, local_world,
                                       wire)
        return
    leaders = [n * local_world for n in range(nnodes)]
    group.leader_group = dist.new_group(ranks=leaders, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if group.host is None:             # one rank per node: the leaders are the world
        group.leader_group = None

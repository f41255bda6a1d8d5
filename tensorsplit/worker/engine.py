"""The two sides of a step: `Engine` on rank 0 (the coordinator's handle on the whole world)
and `serve` on every other rank.

Each step the coordinator broadcasts a `Step` on the control group; every rank runs its
shard's forward (the all-reduces inside happen on the device group); the vocabulary slices of
the logits are gathered to rank 0. The coordinator sees only full-vocabulary logits on the
CPU; it knows nothing of devices.
"""
from __future__ import annotations

import time

import torch

from ..comm import CommGroup
from ..model.transformer import RankModel
from .faults import FaultPlan
from .profile import StepProfile, per_step_us, timed
from .protocol import (COMM_PATHS, OP_COMM_BENCH, OP_FORWARD, OP_PROFILE, OP_SHUTDOWN, Step, comm_bench_header,
                       empty_header, payload_len, profile_header, shutdown_header)


class LoadedRank:
    """One rank's loaded model (its shard of the weights) with its comm group: runs a step and takes part in the gather."""

    def __init__(self, model: RankModel, comm: CommGroup, vocab_sizes: list[int], faults: FaultPlan | None = None,
                 profile: StepProfile | None = None):
        self.model, self.comm, self.vocab_sizes = model, comm, vocab_sizes
        self.faults = faults or FaultPlan(comm.rank, "")
        self.profile = profile          # set when the world is profiled (bench --profile)

    def run(self, step: Step) -> torch.Tensor | None:
        self.faults.at("step")
        local = self.model.forward(step.ids, step.positions, step.slots, step.logit_rows)
        logits = timed(self.profile, "logits_gather", self.comm.gather_logits, local, self.vocab_sizes)
        self.faults.step_done()
        return logits

    def send_profile(self, reset: bool) -> torch.Tensor | None:
        """Every rank's step profile to rank 0: (world, profile.LENGTH) there, None elsewhere."""
        assert self.profile is not None, "the world was not started with profile=True"
        gathered = self.comm.gather_stats(self.profile.vector())
        if reset:
            self.profile.reset()
        return gathered


class StepGuard:
    """Rank 0 defers SIGINT/SIGTERM to the end of a step: a step abandoned half-way on rank 0 would leave
    the workers waiting in a collective. Outside a step the signal interrupts at once."""
    in_step = False
    pending = False

    @classmethod
    def handler(cls, signum, frame) -> None:
        if cls.in_step:
            cls.pending = True
        else:
            raise KeyboardInterrupt


class Engine:
    """Rank 0's handle on the whole world, and all a job sees of it: `forward` runs one step on every
    rank and returns full logits (m, vocab); the properties describe the world for reports."""

    def __init__(self, loaded: LoadedRank, n_slots: int, n_ctx: int):
        assert loaded.comm.rank == 0
        self.loaded, self.n_slots, self.n_ctx = loaded, n_slots, n_ctx
        self.vocab_size = sum(loaded.vocab_sizes)
        self._closed = False

    @property
    def world(self) -> int:
        return self.loaded.comm.world

    @property
    def backend_name(self) -> str:
        return self.loaded.comm.backend.name

    @property
    def all_reduce_path(self) -> str:
        return self.loaded.comm.path_name()

    @property
    def device(self) -> str:
        return str(self.loaded.comm.device)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights rank 0 holds."""
        return self.loaded.model.weight_bytes

    def forward(self, ids, positions, slots, logit_rows) -> torch.Tensor:
        t0 = time.perf_counter_ns()
        step = Step(*(torch.as_tensor(t, dtype=torch.int64).reshape(-1) for t in (ids, positions, slots, logit_rows)))
        comm, profile = self.loaded.comm, self.loaded.profile
        StepGuard.in_step = True
        try:
            timed(profile, "step_message", comm.broadcast_control, step.header())
            timed(profile, "step_message", comm.broadcast_control, step.payload())
            logits = self.loaded.run(step)
            if profile is not None:
                profile.step(time.perf_counter_ns() - t0)
        finally:
            StepGuard.in_step = False
        if StepGuard.pending:
            StepGuard.pending = False
            raise KeyboardInterrupt
        assert logits is not None and logits.shape == (step.logit_rows.numel(), self.vocab_size), logits.shape
        return logits

    def profile(self, reset: bool = True) -> list[dict]:
        """Each rank's step profile since the last reset, in microseconds per step (worker/profile.py
        per_step_us); reset: start new ones. Only in a world started with profile=True."""
        self.loaded.comm.broadcast_control(profile_header(reset))
        return [per_step_us(v) for v in self.loaded.send_profile(reset)]

    @property
    def profiled(self) -> bool:
        return self.loaded.profile is not None

    def add_to_step(self, part: str, ns: int) -> None:
        """Rank 0's work on a step after forward returned (sampling), counted in the profile and its step."""
        if self.loaded.profile is not None:
            self.loaded.profile.extend(part, ns)

    def time_all_reduce(self, n_elems: int, iters: int, path: str) -> float:
        """Seconds per all-reduce of n_elems float64 values on every rank (`bench --comm`)."""
        comm = self.loaded.comm
        comm.broadcast_control(comm_bench_header(n_elems, iters, path))
        return comm.time_all_reduce(n_elems, iters, path)

    def shutdown(self) -> None:
        """Tell the workers to exit their loop. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self.loaded.comm.broadcast_control(shutdown_header())

    def close(self) -> None:
        """Leave the world (this rank's process groups); after shutdown, or after a failure."""
        self.loaded.comm.close()


def serve(loaded: LoadedRank) -> None:
    """Ranks >= 1: run steps until the coordinator says shut down."""
    comm = loaded.comm
    while True:
        header = comm.broadcast_control(empty_header(), idle=True)
        op = int(header[0])
        if op == OP_SHUTDOWN:
            return
        if op == OP_COMM_BENCH:
            comm.time_all_reduce(int(header[1]), int(header[2]), COMM_PATHS[int(header[3])])
            continue
        if op == OP_PROFILE:
            loaded.send_profile(bool(header[1]))
            continue
        assert op == OP_FORWARD, f"unknown op {op}"
        t0 = time.perf_counter_ns()        # a worker's step starts when the header is in
        payload = timed(loaded.profile, "step_message", comm.broadcast_control,
                        torch.empty(payload_len(header), dtype=torch.int64))
        loaded.run(Step.from_payload(header, payload))
        if loaded.profile is not None:
            loaded.profile.step(time.perf_counter_ns() - t0)

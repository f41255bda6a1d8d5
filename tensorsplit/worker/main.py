"""A worker's life: join the world, load this rank's shard, then either coordinate (rank 0)
or serve steps (every other rank) until told to shut down.

Rank 0 shares its process with the coordinator: under plain torchrun there is no other
process to host it, and it saves one copy of the logits per step.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch

from ..comm import init_comm
from ..errors import TensorsplitError
from ..model import make_plan, open_model
from ..model.config import with_rope_options
from ..kernels.choice import choose_kernels
from ..kernels.counting import Counting
from ..kernels.numerics import Numerics
from ..model.transformer import RankModel
from ..plan import WorldPlan
from ..spec import JOB_ENV, WORLD_ENV
from .engine import Engine, LoadedRank, StepGuard, serve
from .faults import FaultPlan
from .pinning import pin, rank_cores, usable_cores
from .profile import Profiling, StepProfile
from .process import RankEnv, die_with_parent, report_failure, resolve_device
from ..messages import say


LOAD_TIMEOUT_S = 3600.0   # a rank still loading after an hour is taken as stuck

Job = Callable[[Engine, object, object], int]   # (engine, GGUFFile, ModelConfig) -> exit code


def main_from_env() -> int:
    """A worker the launcher started: the world's plan from TENSORSPLIT_WORLD, and on rank 0 the job from
    the file TENSORSPLIT_JOB names (none when rank 0 is the launching process: LLM, serve)."""
    from ..coordinator.jobs import job_from_json
    plan = WorldPlan.from_json(os.environ[WORLD_ENV])
    job_file = os.environ.get(JOB_ENV)
    job = job_from_json(Path(job_file).read_text(encoding="utf-8")) if job_file else None
    return run_worker(plan, job)


def run_worker(plan: WorldPlan, job: Job | None) -> int:
    """Entry point of every worker process. Returns the process exit code. Rank 0 runs `job`; the
    other ranks serve steps until rank 0 shuts them down."""
    env = None
    try:
        env = RankEnv.from_environ()
        die_with_parent()
        if env.rank != 0:  # workers have nothing to save: the default SIGTERM action is right
            signal.signal(signal.SIGINT, signal.SIG_IGN)   # the launcher decides when to stop
        else:
            signal.signal(signal.SIGTERM, StepGuard.handler)
            signal.signal(signal.SIGINT, StepGuard.handler)
        return _run(env, plan, job)
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001 - turned into one line for the launcher
        if isinstance(e, SystemExit):
            raise
        report_failure(env.rank if env else int(os.environ.get("RANK", -1)), e)
        if os.environ.get("TENSORSPLIT_DEBUG"):
            traceback.print_exc()
        return 1


def _run(env: RankEnv, plan: WorldPlan, job: Job | None) -> int:
    if env.rank == 0 and job is None:
        raise TensorsplitError("rank 0 was started without a job (start the world with `tensorsplit` or torchrun)")
    loaded, gf, cfg = join_and_load(env, plan)
    try:
        if env.rank != 0:
            serve(loaded)
            return 0
        engine = Engine(loaded, plan.spec.n_slots, plan.spec.n_ctx)
        try:
            return job(engine, gf, cfg)
        finally:
            engine.shutdown()
    finally:
        loaded.comm.close()
        _write_kernel_paths(env.rank, loaded.model.kernels)


def _rank_kernels(device, plan: WorldPlan, profile: StepProfile | None):
    """The rank's kernels (kernels/choice.py); timed (worker/profile.py) in a profiled world; counted
    (kernels/counting.py) when a test asks for the counts through TENSORSPLIT_KERNEL_PATHS, which normal
    use leaves unset."""
    kernels = choose_kernels(device, Numerics(plan.spec.numerics), plan.native)
    if profile is not None:
        kernels = Profiling(kernels, profile)
    return Counting(kernels) if os.environ.get("TENSORSPLIT_KERNEL_PATHS") else kernels


def _write_kernel_paths(rank: int, kernels) -> None:
    """For tests: which kernels computed this rank's matmuls, as <TENSORSPLIT_KERNEL_PATHS>/rank<r>.json."""
    folder = os.environ.get("TENSORSPLIT_KERNEL_PATHS")
    if folder and isinstance(kernels, Counting):
        Path(folder, f"rank{rank}.json").write_text(json.dumps(dict(kernels.counts)))


def join_and_load(env: RankEnv, plan: WorldPlan) -> tuple[LoadedRank, object, object]:
    """Threads, device, backend and split as the world's plan says; join the world; load this rank's shard
    and allocate its cache."""
    spec, mine = plan.spec, plan.ranks[env.rank]
    assert plan.world == env.world, (plan.world, env.world)
    torch.set_num_threads(mine.threads)
    if spec.pin_cores:
        _pin_cores(env, mine.threads)
    device = resolve_device(mine.kind, env.local_rank)
    gf, cfg = open_model(spec.model)
    cfg = with_rope_options(cfg, **spec.rope_options)
    shard_plan = make_plan(cfg, gf.tensors, env.world, plan.ratios)
    identity = {"model_fingerprint": gf.fingerprint(), "model_bytes": spec.model.stat().st_size,
                "world": env.world, "split": [round(r, 6) for r in plan.ratios], "dtype": "float32",
                "devices": plan.kinds, "backend": plan.backend.name, "n_ctx": spec.n_ctx, "n_slots": spec.n_slots,
                "numerics": spec.numerics, "wire_transport": spec.wire_transport, "wire": spec.wire,
                "version": _version()}
    comm = init_comm(env.rank, env.world, env.local_rank, device, plan.backend, env.master_addr, env.master_port,
                     spec.timeout_s, identity, env.local_world,
                     on_timeout=lambda msg: report_failure(env.rank, RuntimeError(msg)),
                     wire_transport=spec.wire_transport, wire=spec.wire)
    faults = FaultPlan(env.rank)
    try:
        bar = _progress_bar(shard_plan.ranks[0].nbytes) if env.rank == 0 and not spec.quiet else None

        def progress(done: int, total: int, name: str) -> None:
            faults.at("load")
            if bar:
                bar(done, total, name)
        profile = StepProfile(comm.all_reduce_wait_ns()) if spec.profile else None
        reduce = comm.all_reduce                             # (a world of one has none to time)
        if profile is not None and env.world > 1:
            reduce = functools.partial(profile.timed, "all_reduce_work", comm.all_reduce)
        model = RankModel(cfg, shard_plan.ranks[env.rank], env.world, reduce, gf,
                          _rank_kernels(device, plan, profile), on_progress=progress)
        model.allocate_cache(spec.n_slots, spec.n_ctx, kv_types=plan.kv_types,
                             decode_graphs="cuda" if plan.cuda_graphs else None)
        if profile is not None:
            model.time_replays = True
            profile.count_replays(model.replayed_ns)
        check_allocation(mine, model)
        # ranks load at different speeds: start stepping only when all have loaded, so that the first
        # step's collectives are not charged with another rank's loading time
        comm.barrier_control("waiting for every rank to load its shard", LOAD_TIMEOUT_S)
        if env.rank == 0 and not spec.quiet:
            shares = ", ".join(f"{r.nbytes / 2**20:.1f}" for r in shard_plan.ranks)
            say(f"loaded; weights per rank (MiB): {shares}; world {env.world} ({plan.backend.why}; "
                f"all-reduce: {comm.path_name()}{'; decode: CUDA graphs' if plan.cuda_graphs else ''})")
    except BaseException:
        comm.close()
        raise
    return LoadedRank(model, comm, [r.local_vocab for r in shard_plan.ranks], faults, profile), gf, cfg


def _pin_cores(env: RankEnv, threads: int) -> None:
    """This rank's threads on cores of their own (worker/pinning.py), unless the node has too few."""
    cores = rank_cores(env.local_rank, env.local_world, threads)
    if cores is None:
        if env.local_rank == 0:
            say(f"{env.local_world} worker(s) x {threads} thread(s) is more than the {len(usable_cores())} cores "
                f"here: threads are not pinned")
        return
    pin(cores)


CHECK_PLAN_ENV = "TENSORSPLIT_CHECK_PLAN"   # set (the test suite sets it): a rank holding other bytes than
CHECK_PLAN_TOLERANCE = 0.01                 # its plan said, by more than this, fails


def check_allocation(mine, model) -> None:
    """With TENSORSPLIT_CHECK_PLAN set, the bytes this rank allocated (weights as loaded, its KV cache)
    must be what the world's plan said, within 1%: the plan that `info` prints and --split auto fits
    is then the one the ranks hold."""
    if not os.environ.get(CHECK_PLAN_ENV):
        return
    held = {"weights": model.weight_bytes, "kv_cache": model.cache.nbytes}
    planned = {"weights": mine.weights, "kv_cache": mine.kv_cache + mine.graph_scratch}
    for what in held:
        if abs(held[what] - planned[what]) > CHECK_PLAN_TOLERANCE * max(planned[what], 1):
            raise TensorsplitError(f"rank {mine.rank} holds {held[what]} bytes of {what}, its plan said "
                                   f"{planned[what]}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("tensorsplit")
    except PackageNotFoundError:
        return "unknown"


def _progress_bar(total: int):
    """Load progress of rank 0's shard on stderr (the other ranks load in parallel)."""
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading rank 0's shard", file=sys.stderr,
               leave=False, disable=None)

    def step(done: int, total_: int, name: str) -> None:
        bar.update(done - bar.n)
        if done >= total_:
            bar.close()
    return step


__all__ = ["join_and_load", "run_worker"]

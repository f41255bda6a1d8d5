"""A world whose rank 0 is the calling process (LLM, serve, scripts): the one way such a world comes up.

    world = World.start(spec, node)            # checks, plans, starts ranks 1.., loads rank 0's shard
    world.forward(ids, positions, slots, rows) # Engine.forward; a failure anywhere -> WorkerFailed

or in two steps, where the caller wants the other ranks started before rank 0 loads (serve answers
HTTP meanwhile): `World(plan, node, on_failure)`, then `load()` on the thread that will step it.
The launcher starts and watches the other ranks; if one dies, the call in progress (or the next)
raises WorkerFailed naming it, and `on_failure` hears the launcher's line once.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from ..errors import CollectiveError, TensorsplitError, WorkerFailed
from ..plan import WorldPlan, check_world, plan_world
from ..spec import NodeSpec, WorldSpec
from ..worker.engine import Engine
from ..worker.main import join_and_load
from ..worker.pinning import restore_affinity
from ..worker.process import RankEnv
from .spawn import Launch

FAILURE_REPORT_S = 5.0   # how long to wait for the launcher's account of a failure seen in a collective


class World:
    def __init__(self, plan: WorldPlan, node: NodeSpec, on_failure: Callable[[str], None] | None = None):
        """Start ranks 1.. of this node and watch them (rank 0 is loaded by `load`)."""
        self.plan, self.node = plan, node
        self.engine: Engine | None = None
        self.failure: str | None = None
        self.gf = self.config = None
        self._on_failure = on_failure
        self._affinity = os.sched_getaffinity(0)     # the caller's cores, which rank 0 may pin (restored by close)
        self._launch = Launch(plan, node, rank0_here=True)
        self._launch.watch_from_thread(self._failed)

    @classmethod
    def start(cls, spec: WorldSpec, node: NodeSpec) -> "World":
        """Check the flags, plan the world, start it and load rank 0's shard."""
        check_world(spec, node)
        world = cls(plan_world(spec, node), node)
        try:
            world.load()
        except BaseException:
            world.close()
            raise
        return world

    def load(self) -> Engine:
        """Join the world as rank 0 and load its shard. A failure of another rank meanwhile comes out as
        WorkerFailed naming it."""
        env = RankEnv(0, self.node.world, 0, self.node.nproc, self.node.master_addr, self._launch.port)
        try:
            loaded, self.gf, self.config = join_and_load(env, self.plan)
        except BaseException as e:
            raise self.explained(e) from None
        self.engine = Engine(loaded, self.plan.spec.n_slots, self.plan.spec.n_ctx)
        return self.engine

    def _failed(self, line: str) -> None:
        self.failure = line
        if self._on_failure is not None:
            self._on_failure(line)

    def check(self) -> Engine:
        """The engine, or WorkerFailed when the world has failed or is closed."""
        if self.failure:
            raise WorkerFailed(self.failure)
        if self.engine is None:
            raise WorkerFailed("this world is closed")
        return self.engine

    def forward(self, ids, positions, slots, logit_rows):
        engine = self.check()
        try:
            return engine.forward(ids, positions, slots, logit_rows)
        except BaseException as e:
            raise self.explained(e) from None

    def explained(self, e: BaseException) -> BaseException:
        """An error seen from rank 0 because a peer died (a collective that lost it) becomes WorkerFailed,
        with the launcher's line naming the rank, once the watcher has it."""
        if isinstance(e, (KeyboardInterrupt, WorkerFailed)):
            return e
        lost_peer = isinstance(e, CollectiveError) or (isinstance(e, (RuntimeError, OSError))
                                                        and not isinstance(e, TensorsplitError))
        deadline = time.monotonic() + (FAILURE_REPORT_S if lost_peer else 0.0)
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return WorkerFailed(self.failure) if self.failure else e

    def close(self) -> None:
        try:
            if self.engine is not None:
                engine, self.engine = self.engine, None
                try:
                    if self.failure is None:
                        engine.shutdown()
                finally:
                    engine.close()
            self._launch.close()
        finally:
            restore_affinity(self._affinity)

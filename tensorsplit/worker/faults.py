"""Fault injection for the fault-tolerance tests: make one rank raise or pause at a chosen point.

TENSORSPLIT_FAULT="<rank>:<where>:<action>", where is `load` (after the first tensor of the
shard is loaded) or `step<N>` (before the N-th forward, counting from 0), and action is
`raise` (an exception inside the rank's forward path) or `sleep<S>` (pause S seconds, so a test
can kill or signal the rank at that point). A pause is announced on stderr when it starts
("tensorsplit: fault: rank 1 pausing at load"), so that a test acts only once the rank is
there, and a paused step again once its forward and logits gather have completed ("... finished
step3"). Unset in normal use; the checks cost one comparison.
"""
from __future__ import annotations

import os
import time
from ..messages import say


class InjectedFault(RuntimeError):
    pass


class FaultPlan:
    def __init__(self, rank: int, spec: str | None = None):
        spec = spec if spec is not None else os.environ.get("TENSORSPLIT_FAULT", "")
        self.where = self.action = None
        if spec:
            r, where, action = spec.split(":")
            if int(r) == rank:
                self.where, self.action = where, action
        self.rank, self.steps = rank, 0
        self.paused_step: str | None = None

    def at(self, where: str) -> None:
        if where == "step":
            where, self.steps = f"step{self.steps}", self.steps + 1
        if where != self.where:
            return
        self.where = None  # once
        if self.action == "raise":
            raise InjectedFault(f"injected fault at {where} on rank {self.rank}")
        if self.action.startswith("sleep"):
            self._say(f"pausing at {where}")
            time.sleep(float(self.action[5:]))
            if where.startswith("step"):
                self.paused_step = where

    def step_done(self) -> None:
        """Called after each step's forward and gather: announces the end of a paused step."""
        if self.paused_step is not None:
            self._say(f"finished {self.paused_step}")
            self.paused_step = None

    def _say(self, what: str) -> None:
        say(f"fault: rank {self.rank} {what}")

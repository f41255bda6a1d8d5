"""A deadline on every collective, enforced from a thread.

Gloo's own timeouts do not fire in every case (a peer stopped with SIGSTOP mid-collective left
a rank waiting forever in testing), and a hang is the worst failure a user can meet. Each
collective on the data path runs inside `watch(...)`; if one lasts longer than the timeout, the
thread reports it through `on_timeout` and ends the process, so the launcher sees the failure.
Only collectives are timed, never the computation between them, and a worker idle-waiting for
the coordinator's next step is not watched.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator


class CollectiveWatchdog:
    def __init__(self, timeout_s: float, on_timeout: Callable[[str], None] | None):
        self.timeout_s, self.on_timeout = timeout_s, on_timeout
        self._since: float | None = None
        self._what = ""
        self._limit = timeout_s
        threading.Thread(target=self._run, name="tensorsplit-watchdog", daemon=True).start()

    @contextmanager
    def watch(self, what: str, timeout_s: float | None = None) -> Iterator[None]:
        """Time the block; timeout_s overrides the default for a wait known to be longer (loading)."""
        self._what, self._limit, self._since = what, timeout_s or self.timeout_s, time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _run(self) -> None:
        tick = min(0.2, self.timeout_s / 10)
        while True:
            time.sleep(tick)
            since = self._since
            if since is not None and time.monotonic() - since > self._limit:
                msg = f"Timed out after {self._limit:g} s in {self._what}, waiting for the other ranks"
                if self.on_timeout:
                    self.on_timeout(msg)
                os._exit(1)

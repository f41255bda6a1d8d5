"""Process-level plumbing of a worker: the torchrun environment, parent-death handling, thread
count, device choice, and the one-line error report the launcher reads.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from dataclasses import dataclass

import torch

from ..errors import CollectiveError, TensorsplitError
from ..messages import say


@dataclass(frozen=True)
class RankEnv:
    """The torchrun-style environment of one worker process."""
    rank: int
    world: int
    local_rank: int
    local_world: int
    master_addr: str
    master_port: int

    @staticmethod
    def from_environ() -> "RankEnv":
        def need(key: str) -> str:
            if key not in os.environ:
                raise TensorsplitError(f"environment variable {key} is not set: start workers with "
                                       "`tensorsplit` or `torchrun`")
            return os.environ[key]
        world = int(need("WORLD_SIZE"))
        return RankEnv(
            rank=int(need("RANK")), world=world,
            local_rank=int(os.environ.get("LOCAL_RANK", need("RANK"))),
            local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(os.environ.get("MASTER_PORT", "29500")),
        )


def in_worker() -> bool:
    """True inside a process started by the launcher or by torchrun."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the launcher dies, so no worker is orphaned."""
    parent = os.environ.get("TENSORSPLIT_LAUNCHER_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):  # the launcher died before prctl took effect
        os._exit(1)


def resolve_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    module = getattr(torch, kind)
    if not module.is_available():
        raise TensorsplitError(f"--device {kind}: no {kind} device is available to this process")
    if kind == "mps":
        return torch.device("mps")
    # The launcher pins one GPU per worker (CUDA_VISIBLE_DEVICES); under torchrun all are visible.
    count = module.device_count()
    return torch.device(kind, 0 if count == 1 else local_rank % count)


COMM_FAILURE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out",
                        "timed out", "Connection refused", "NCCL", "ProcessGroup", "gloo")


def report_failure(rank: int, exc: BaseException) -> str:
    """One line naming the rank and the cause, written to stderr and to the launcher's error file.

    A failure seen through a collective (a peer died or timed out) is marked secondary, so the
    launcher blames the rank that failed first rather than the ones that noticed it."""
    if isinstance(exc, CollectiveError):
        msg, secondary = str(exc), True
    elif isinstance(exc, TensorsplitError):
        msg, secondary = str(exc), False
    elif isinstance(exc, (RuntimeError, OSError)) and any(m in str(exc) for m in COMM_FAILURE_MARKERS):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        secondary = True
        msg = first[:200] if first.startswith("Timed out") else f"lost contact with another rank ({first[:200]})"
    else:
        msg, secondary = f"{type(exc).__name__}: {exc}", False
    msg = msg.replace("\n", " ")
    path = os.environ.get("TENSORSPLIT_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"rank": rank, "message": msg, "secondary": secondary}, f)
    else:  # under torchrun: say it ourselves
        say(f"rank {rank}: {msg}")
    return msg

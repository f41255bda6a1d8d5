"""Forming the world: the TCP store, arrival of every rank, and agreement before any weight moves.

- Rank 0 serves the store on the address the user gave (--master-addr), not on every interface:
  we bind the listening socket ourselves and hand it to torch's TCPStore.
- Every rank posts its identity (model fingerprint and size, world size, split, compute dtype,
  device kinds, tensorsplit version) as JSON text in the store. Rank 0 waits for all of them
  until the timeout and then names the ranks that never arrived; it compares every identity
  with its own and publishes one verdict, so every rank fails fast with the same message,
  both values in it. Nothing is pickled: store values are JSON text.
- A failing verdict must reach every rank before rank 0 exits and takes the store with it:
  each rank counts itself as having read the verdict, and rank 0 waits (briefly) for that.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time

import torch.distributed as dist

from ..errors import TensorsplitError

POLL_S = 0.1
VERDICT_READ_WAIT_S = 10.0  # how long rank 0 keeps the store up for the others to read a failing verdict
_LISTENERS: list[socket.socket] = []


def _listen_socket(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((addr, port))
    except OSError as e:
        s.close()
        raise TensorsplitError(f"rank 0: cannot listen on --master-addr {addr} --master-port {port}: "
                               f"{e.strerror}") from None
    s.listen(128)
    return s


def open_store(rank: int, addr: str, port: int, timeout_s: float):
    """The TCP store: served by rank 0 on addr:port only; the others connect, retrying until the timeout.
    Under torchrun the agent already serves it there, and every rank connects."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        sock = _listen_socket(addr, port)
        store = dist.TCPStore(addr, port, None, True, timeout, wait_for_workers=False,
                              master_listen_fd=sock.fileno())
        _LISTENERS.append(sock)  # the store serves on this fd: keep the socket object alive with the process
        return store
    try:
        return dist.TCPStore(addr, port, None, False, timeout)
    except (RuntimeError, OSError) as e:
        raise TensorsplitError(f"rank {rank}: no rendezvous at {addr}:{port} within {timeout_s:g} s "
                               f"(is node 0 started, and is --master-addr its address?): "
                               f"{str(e).strip().splitlines()[0][:160]}") from None


def agree(store, rank: int, world: int, identity: dict, timeout_s: float, local_world: int) -> None:
    """Every rank posts `identity`; rank 0 checks arrivals and agreement; all ranks get the verdict."""
    store.set(f"ts/identity/{rank}", json.dumps({"identity": identity, "node_rank": rank // local_world}))
    if rank == 0:
        verdict = _judge(store, world, identity, timeout_s, local_world)
        store.set("ts/verdict", verdict)
        if verdict != "ok":
            _wait_for_readers(store, world)
    else:
        try:
            verdict = store.get("ts/verdict").decode()
            store.add("ts/verdict_read", 1)
        except (RuntimeError, OSError) as e:
            raise TensorsplitError(f"rank {rank}: no verdict from rank 0 within {timeout_s:g} s: "
                                   f"{str(e).strip().splitlines()[0][:160]}") from None
    if verdict != "ok":
        raise TensorsplitError(verdict)


def _wait_for_readers(store, world: int) -> None:
    """Keep serving the store until every arrived rank has read the verdict, or a short limit passes."""
    arrived = sum(store.check([f"ts/identity/{r}"]) for r in range(1, world))
    deadline = time.monotonic() + VERDICT_READ_WAIT_S
    while store.add("ts/verdict_read", 0) < arrived and time.monotonic() < deadline:
        time.sleep(POLL_S)


def _judge(store, world: int, mine: dict, timeout_s: float, local_world: int) -> str:
    keys = [f"ts/identity/{r}" for r in range(world)]
    deadline = time.monotonic() + timeout_s
    while True:
        arrived = [r for r in range(world) if store.check([keys[r]])]
        if len(arrived) == world:
            break
        if time.monotonic() > deadline:
            missing = sorted(set(range(world)) - set(arrived))
            nodes = sorted({r // local_world for r in missing})
            return (f"rank(s) {', '.join(map(str, missing))} did not join within {timeout_s:g} s "
                    f"(node(s) {', '.join(map(str, nodes))} if every node runs {local_world} worker(s)); "
                    "check that every node was started with the same --nnodes/--master-addr/--master-port")
        time.sleep(POLL_S)
    for r in range(1, world):
        posted = json.loads(store.get(keys[r]).decode())
        theirs = posted["identity"]
        # in the order rank 0 lists its identity (the model and the world first), so that a message names
        # the cause (world 3 vs 2) rather than what follows from it (three devices vs two)
        for field in [*mine, *sorted(set(theirs) - set(mine))]:
            if theirs.get(field) != mine.get(field):
                return (f"rank {r} (node {posted['node_rank']}) disagrees with rank 0 on {field}: "
                        f"{theirs.get(field)!r} vs {mine.get(field)!r}")
    return "ok"

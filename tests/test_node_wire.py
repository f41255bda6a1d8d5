"""The TCP wire between nodes (comm/wire.py, kernels/csrc/wire.cpp): N node leaders as N processes on
127.0.0.1, meeting through a torch.distributed TCPStore, as the workers do.

The all-reduce is checked bit for bit against NumPy adding the nodes' float64/float32 parts in node
order (the order every node must use, so that every node gets the same bits); broadcast and gather
against the data each node sent; faults against the one line a user reads.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import socket
import time
import traceback

import numpy as np
import pytest
import torch

from tensorsplit.kernels import native
from tensorsplit.kernels.kv_types import decode, encode, kv_type

pytestmark = pytest.mark.skipif(not native(announce=False), reason="the native library did not build here")

TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _part(node: int, n: int, dtype) -> np.ndarray:
    """Node `node`'s partial sums: values of mixed magnitude, so that the sum order shows in the bits."""
    rng = np.random.default_rng(1000 + node)
    return (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 6, n)).astype(dtype)


def _node(node: int, n_nodes: int, port: int, script: str, out, timeout_s: float) -> None:
    try:
        from tensorsplit.comm.wire import WIRE_FORMATS, WireMesh
        store = torch.distributed.TCPStore("127.0.0.1", port, n_nodes, node == 0,
                                           timeout=datetime.timedelta(seconds=30))
        mesh = WireMesh.open(store, node, n_nodes, "127.0.0.1", timeout_s)
        result = {}
        if script == "collectives":
            for dtype, n in ((np.float64, 2048), (np.float32, 576), (np.float64, 300_000), (np.float64, 0)):
                x = torch.from_numpy(_part(node, n, dtype).copy())
                result[(np.dtype(dtype).name, n)] = mesh.all_reduce(x).numpy().copy()
            for wire in ("bf16", "q8"):
                mesh.format = WIRE_FORMATS[wire]
                for n in (2048, 1000):
                    x = torch.from_numpy(_part(node, n, np.float64) * 1e-3)
                    result[(wire, n)] = mesh.all_reduce(x).numpy().copy()
            mesh.format = WIRE_FORMATS["f32"]
            header = torch.full((4,), node, dtype=torch.int64)
            result["broadcast"] = mesh.broadcast(header, 0).numpy().copy()
            result["broadcast_from_last"] = mesh.broadcast(torch.full((3,), float(node)), n_nodes - 1).numpy().copy()
            result["gather"] = mesh.gather(torch.full((2, 3), float(node)), 0).numpy().copy()
            from tensorsplit.comm import gloo_algorithms
            torch.distributed.init_process_group("gloo", store=store, rank=node, world_size=n_nodes)
            for name in gloo_algorithms.ALGORITHMS:
                if name != "doubling" or n_nodes & (n_nodes - 1) == 0:
                    x = torch.from_numpy(_part(node, 2048, np.float64).copy())
                    result[name] = gloo_algorithms.run(name, x, torch.distributed.group.WORLD, node, n_nodes).numpy()
            torch.distributed.destroy_process_group()
        elif script == "exit_early":
            if node == n_nodes - 1:
                mesh.close()
                out.put((node, "exited"))
                return
            mesh.all_reduce(torch.ones(16, dtype=torch.float64))
        elif script == "stall":
            if node == n_nodes - 1:
                time.sleep(timeout_s + 3)
                out.put((node, "slept"))
                return
            mesh.all_reduce(torch.ones(16, dtype=torch.float64))
        elif script == "out_of_step":
            x = torch.ones(16 if node == 0 else 32, dtype=torch.float64)
            mesh.all_reduce(x)
        out.put((node, result))
    except Exception as e:   # noqa: BLE001 - the parent asserts on the message
        out.put((node, f"{type(e).__name__}: {e}" + ("" if "Error" in type(e).__name__ else traceback.format_exc())))


def _run(n_nodes: int, script: str, timeout_s: float = TIMEOUT_S) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_node, args=(k, n_nodes, port, script, out, timeout_s)) for k in range(n_nodes)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(n_nodes):
            node, value = out.get(timeout=timeout_s + 60)
            results[node] = value
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return results


@pytest.mark.parametrize("n_nodes", [2, 3, 4])
def test_all_reduce_sums_in_node_order_and_collectives_carry_every_node(n_nodes):
    results = _run(n_nodes, "collectives")
    for node, r in results.items():
        assert isinstance(r, dict), f"node {node}: {r}"
    for dtype, n in ((np.float64, 2048), (np.float32, 576), (np.float64, 300_000), (np.float64, 0)):
        expected = _part(0, n, dtype).copy()
        for k in range(1, n_nodes):
            expected += _part(k, n, dtype)                  # node order
        for node in range(n_nodes):
            got = results[node][(np.dtype(dtype).name, n)]
            assert got.dtype == dtype and got.tobytes() == expected.tobytes(), (node, dtype, n)
    for wire in ("bf16", "q8"):      # each part as the wire carried it: kv_types' transcription of llama.cpp's
        t = kv_type("bf16" if wire == "bf16" else "q8_0")             # rounding, zero-padded to whole blocks
        for n in (2048, 1000):
            expected = None
            for k in range(n_nodes):
                x = torch.zeros(-(-n // 32) * 32)
                x[:n] = torch.from_numpy(_part(k, n, np.float64) * 1e-3).float()
                sent = decode(encode(x[None], t), t, x.numel())[0, :n].double().numpy()
                expected = sent.copy() if expected is None else expected + sent
            for node in range(n_nodes):
                assert results[node][(wire, n)].tobytes() == expected.tobytes(), (wire, n, node)
            exact = sum(_part(k, n, np.float64) * 1e-3 for k in range(n_nodes))
            assert np.abs(results[0][(wire, n)] - exact).max() < (0.02 if wire == "q8" else 0.01) * np.abs(exact).max()
    if n_nodes >= 3:   # the check can fail: another order gives other bits on this data
        other = _part(n_nodes - 1, 2048, np.float64).copy()
        for k in range(n_nodes - 2, -1, -1):
            other += _part(k, 2048, np.float64)
        assert other.tobytes() != results[0][("float64", 2048)].tobytes()
    for node in range(n_nodes):
        assert results[node]["broadcast"].tolist() == [0] * 4
        assert results[node]["broadcast_from_last"].tolist() == [float(n_nodes - 1)] * 3
    assert results[0]["gather"].tolist() == [[[float(k)] * 3] * 2 for k in range(n_nodes)]
    # bench --comm's algorithms on Gloo: rank order for the exchange and the all-gather; recursive doubling
    # adds pairs first, the same way on every rank
    in_order = results[0][("float64", 2048)]
    for node in range(n_nodes):
        assert results[node]["exchange"].tobytes() == in_order.tobytes()
        assert results[node]["all_gather"].tobytes() == in_order.tobytes()
        if n_nodes != 3:
            assert results[node]["doubling"].tobytes() == results[0]["doubling"].tobytes()
            np.testing.assert_allclose(results[node]["doubling"], in_order, rtol=1e-12, atol=1e-9)
    assert all(results[k]["gather"].size == 0 for k in range(1, n_nodes))


def test_a_node_that_exits_is_named_at_once():
    t0 = time.monotonic()
    results = _run(3, "exit_early", timeout_s=60.0)
    assert time.monotonic() - t0 < 45, "a closed connection must fail the wait, not its 60 s timeout"
    assert results[2] == "exited"
    for node in (0, 1):
        assert results[node].startswith("CollectiveError: rank 2 (node 2) closed its connection during an all-reduce"), \
            results[node]


def test_a_stalled_node_is_named_after_the_timeout():
    results = _run(2, "stall", timeout_s=3.0)
    assert results[0].startswith("CollectiveError: Timed out after 3 s in an all-reduce between nodes, waiting "
                                 "for rank 1 (node 1)"), results[0]


def test_nodes_out_of_step_fail_with_both_sizes():
    results = _run(2, "out_of_step")
    assert "is out of step" in results[0] and "of 256 bytes where this node (0)" in results[0], results[0]
    assert "of 128 bytes where this node (1)" in results[1], results[1]

"""Multi-node worlds: two real hosts as two network namespaces joined by a veth pair, one node
each; arrival timeouts and agreement checks between nodes.

The namespaces are made by the test itself (root and iproute2 needed). Where the machine forbids
them (not root, or the kernel refuses), the namespace test skips with the reason, which `-rs`
shows in the summary; a missing `ip` command is a broken test machine, and fails.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from cli_helpers import ROOT, assert_all_gone, listeners, run_cli, start_cli, wait_for_workers, wait_until
from tensorsplit.model.gguf_file import GGUFFile

PROMPT = "The capital of France is"
GEN = ["-p", PROMPT, "-n", "8", "--temp", "0", "--json"]


class Netns:
    """Two namespaces, A (10.213.7.1) and B (10.213.7.2), on a veth pair."""

    def __init__(self):
        tag = str(os.getpid() % 100000)
        self.a, self.b = f"tsA{tag}", f"tsB{tag}"
        self.addr_a, self.addr_b = "10.213.7.1", "10.213.7.2"
        va, vb = f"tva{tag}", f"tvb{tag}"
        steps = [["netns", "add", self.a], ["netns", "add", self.b],
                 ["link", "add", va, "type", "veth", "peer", "name", vb],
                 ["link", "set", va, "netns", self.a], ["link", "set", vb, "netns", self.b],
                 ["-n", self.a, "addr", "add", f"{self.addr_a}/24", "dev", va],
                 ["-n", self.b, "addr", "add", f"{self.addr_b}/24", "dev", vb],
                 ["-n", self.a, "link", "set", va, "up"], ["-n", self.b, "link", "set", vb, "up"],
                 ["-n", self.a, "link", "set", "lo", "up"], ["-n", self.b, "link", "set", "lo", "up"]]
        for s in steps:
            r = subprocess.run(["ip", *s], capture_output=True, text=True)
            if r.returncode != 0:
                self.close()
                forbidden = any(m in r.stderr for m in ("Operation not permitted", "Permission denied"))
                raise (PermissionError if forbidden else RuntimeError)(f"ip {' '.join(s)}: {r.stderr.strip()}")

    def popen(self, ns: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "tensorsplit", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    def close(self):
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root, and this test runs as uid " + str(os.geteuid()))
    if shutil.which("ip") is None:
        pytest.fail("the `ip` command (iproute2) is missing: install it to make network namespaces")
    try:
        ns = Netns()
    except PermissionError as e:
        pytest.skip(f"this machine forbids network namespaces: {e}")
    yield ns
    ns.close()


def _tokens(stdout: str) -> list[int]:
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])["token_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("per_node", [1, 2])
def test_two_namespace_nodes_equal_single_node(netns, smollm2_path, per_node):
    """Two nodes of 1 rank (the TCP wire between them) and of 2 ranks (the hierarchical all-reduce: shared
    memory inside each node, the wire between the nodes' leaders) give the tokens of one rank on one node."""
    single = run_cli("generate", "-m", str(smollm2_path), *GEN, "--nproc-per-node", "1")
    assert single.returncode == 0, single.stderr
    port = "29613"
    common = ["generate", "-m", str(smollm2_path), *GEN, "--nnodes", "2", "--nproc-per-node", str(per_node),
              "--master-addr", netns.addr_a, "--master-port", port, "--threads", "1", "--timeout", "60"]
    node0 = netns.popen(netns.a, *common, "--node-rank", "0")
    node1 = netns.popen(netns.b, *common, "--node-rank", "1")
    out0, err0 = node0.communicate(timeout=240)
    out1, err1 = node1.communicate(timeout=60)
    assert node0.returncode == 0, err0
    assert node1.returncode == 0, err1
    assert _tokens(out0) == _tokens(single.stdout)
    path = ("shared memory inside each node (2 ranks), TCP wire between 2 nodes" if per_node == 2
            else "all-reduce: TCP wire between 2 nodes")
    assert path in err0, err0
    assert out1.strip() == ""          # the coordinator and its output live on node 0


@pytest.mark.parametrize("transport", ["tcp", "gloo"])
def test_two_loopback_nodes_of_two_ranks_equal_one_rank(smollm2_path, transport):
    """The hierarchical all-reduce without namespaces: two "nodes" of 2 ranks each on 127.0.0.1 (two
    launchers, --node-rank 0 and 1). Inside each node the ranks sum through their node's shared-memory
    segment, the two leaders all-reduce over the TCP wire (or Gloo, --wire-transport gloo), and each node
    shares the sum back; the step messages and the logits cross between the leaders too. The greedy
    tokens are those of one rank on one node, and neither launcher leaves a worker or a segment behind."""
    single = run_cli("generate", "-m", str(smollm2_path), *GEN, "--nproc-per-node", "1")
    assert single.returncode == 0, single.stderr
    common = ["generate", "-m", str(smollm2_path), *GEN, "--nnodes", "2", "--nproc-per-node", "2",
              "--master-addr", "127.0.0.1", "--master-port", _free_port(), "--threads", "1", "--timeout", "60",
              "--wire-transport", transport]
    node0, node1 = start_cli(*common, "--node-rank", "0"), start_cli(*common, "--node-rank", "1")
    try:
        code0, err0, _ = node0.finish(240)
        code1, err1, _ = node1.finish(60)
    finally:
        node0.kill()
        node1.kill()
    assert code0 == 0, err0
    assert code1 == 0, err1
    assert _tokens(node0.out.text()) == _tokens(single.stdout)
    between = "TCP wire" if transport == "tcp" else "Gloo"
    assert f"shared memory inside each node (2 ranks), {between} between 2 nodes" in err0, err0
    assert node1.out.text().strip() == ""
    for node in (node0, node1):
        assert_all_gone(node.pid)


def test_missing_node_is_named_after_the_timeout(smollm2_path):
    t0 = time.monotonic()
    r = run_cli("generate", "-m", str(smollm2_path), "-p", "x", "--nnodes", "2", "--node-rank", "0",
                "--nproc-per-node", "1", "--master-port", _free_port(), "--timeout", "3")
    assert r.returncode == 1
    assert "tensorsplit: rank 0 failed: rank(s) 1 did not join within 3 s (node(s) 1" in r.stderr
    assert time.monotonic() - t0 < 60


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _edited_copy(src, dst):
    """A copy of the GGUF `src` with one letter of its general.name changed: the same size, another
    header, so another fingerprint."""
    data = bytearray(src.read_bytes())
    at = data.index(b"general.name") + len(b"general.name") + 4 + 8    # value type, string length
    data[at] = ord("X") if data[at] != ord("X") else ord("Y")
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("field", ["split", "model_fingerprint", "world"])
def test_nodes_that_disagree_fail_fast_with_both_values(smollm2_path, tmp_path, field):
    """README: at start the ranks agree on the model file (size and a hash of its header and tensor
    table), the world size, the split and the dtype; a disagreement fails at once with both values.
    Two nodes on this machine, node 1 differing in one thing (the dtype cannot differ from the command
    line: see test_agreement_covers_the_dtype)."""
    port = _free_port()
    common = ["generate", "-p", "x", "--nproc-per-node", "1", "--master-port", port, "--timeout", "30"]
    node0 = ["-m", str(smollm2_path), "--nnodes", "2", "--node-rank", "0", "--split", "1,1"]
    node1 = ["-m", str(smollm2_path), "--nnodes", "2", "--node-rank", "1", "--split", "1,1"]
    if field == "split":
        node1[-1] = "3,1"
        msg = "rank 1 (node 1) disagrees with rank 0 on split: [0.75, 0.25] vs [0.5, 0.5]"
    elif field == "model_fingerprint":
        other = _edited_copy(smollm2_path, tmp_path / "other.gguf")
        node1[1] = str(other)
        with GGUFFile(smollm2_path) as a, GGUFFile(other) as b:
            assert a.fingerprint() != b.fingerprint()
            msg = f"rank 1 (node 1) disagrees with rank 0 on model_fingerprint: {b.fingerprint()!r} vs {a.fingerprint()!r}"
    else:
        node1[3], node1[-2:] = "3", []         # a world of 3 on node 1's side, 2 on node 0's
        node0[-2:] = []
        msg = "rank 1 (node 1) disagrees with rank 0 on world: 3 vs 2"
    t0 = time.monotonic()
    proc1 = subprocess.Popen([sys.executable, "-m", "tensorsplit", *common, *node1],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        r0 = run_cli(*common, *node0)
        _, err1 = proc1.communicate(timeout=60)
    finally:
        if proc1.poll() is None:
            proc1.kill()
            proc1.wait()
    assert r0.returncode == 1 and f"tensorsplit: rank 0 failed: {msg}" in r0.stderr, r0.stderr
    assert proc1.returncode == 1 and f"tensorsplit: rank 1 failed: {msg}" in err1, err1
    assert time.monotonic() - t0 < 30          # at once: well before the 30 s rendezvous timeout


def test_agreement_covers_the_dtype(smollm2_path, monkeypatch):
    """The identity a rank posts holds the model's size and fingerprint, the world, the split and the
    dtype (captured where join_and_load hands it to init_comm); and agree() refuses two ranks whose
    dtype differs, both values in the message, on every rank (two ranks as threads on a real store)."""
    import threading

    import torch
    from torch.distributed import TCPStore

    from tensorsplit.comm.rendezvous import agree
    from tensorsplit.errors import TensorsplitError
    from tensorsplit.plan import plan_world
    from tensorsplit.spec import NodeSpec, WorldSpec
    from tensorsplit.worker import main as worker_main
    from tensorsplit.worker.pinning import restore_affinity
    from tensorsplit.worker.process import RankEnv

    class Captured(Exception):
        pass

    def capture(*args, **kwargs):
        raise Captured(args[8])                   # init_comm(rank, world, ..., identity, ...)
    monkeypatch.setattr(worker_main, "init_comm", capture)
    threads, cores = torch.get_num_threads(), os.sched_getaffinity(0)
    try:
        plan = plan_world(WorldSpec(model=smollm2_path, device="cpu"), NodeSpec(nproc=1, nnodes=2, master_port=1))
        worker_main.join_and_load(RankEnv(0, 2, 0, 1, "127.0.0.1", 1), plan)
    except Captured as e:
        identity = e.args[0]
    finally:
        torch.set_num_threads(threads)            # join_and_load set this process's threads for a rank,
        restore_affinity(cores)                   # and pinned them: later tests in this process need every core
    with GGUFFile(smollm2_path) as gf:
        assert identity["model_fingerprint"] == gf.fingerprint()
    assert identity["model_bytes"] == smollm2_path.stat().st_size
    assert (identity["world"], identity["split"], identity["dtype"]) == (2, [0.5, 0.5], "float32")

    port = int(_free_port())
    store0 = TCPStore("127.0.0.1", port, None, True, datetime.timedelta(seconds=10), wait_for_workers=False)
    store1 = TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=10))
    errors = {}

    def rank(r, store, dtype):
        try:
            agree(store, r, 2, {**identity, "dtype": dtype}, 10, 1)
        except TensorsplitError as e:
            errors[r] = str(e)
    ranks = [threading.Thread(target=rank, args=(1, store1, "bfloat16")),
             threading.Thread(target=rank, args=(0, store0, "float32"))]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join(60)
    msg = "rank 1 (node 1) disagrees with rank 0 on dtype: 'bfloat16' vs 'float32'"
    assert errors == {0: msg, 1: msg}


def test_rendezvous_listens_on_master_addr_only(smollm2_path):
    """README: node 0 hosts the rendezvous, bound to --master-addr only. With --master-addr 127.0.0.2
    (a loopback address other than the usual one), the only socket listening on the port is on
    127.0.0.2, and a connection to 127.0.0.1 on that port is refused."""
    port = int(_free_port())
    job = start_cli("generate", "-m", str(smollm2_path), "-p", "x", "--nnodes", "2", "--node-rank", "0",
                    "--nproc-per-node", "1", "--master-addr", "127.0.0.2", "--master-port", str(port),
                    "--timeout", "120")
    try:
        wait_until(lambda: listeners(port) or job.proc.poll() is not None, 120, f"a listener on port {port}")
        assert job.proc.poll() is None, job.err.text()
        assert listeners(port) == ["127.0.0.2"]
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
        with socket.create_connection(("127.0.0.2", port), timeout=10):
            pass                                  # the rendezvous itself is there
        os.kill(job.pid, signal.SIGTERM)          # node 1 never comes; stop waiting for it
        code, err, _ = job.finish(60)
    finally:
        job.kill()
    assert code == 130, err
    assert_all_gone(job.pid)


def test_sigkill_of_a_node_during_decode_names_its_rank(smollm2_path):
    """Two loopback nodes of 1 rank each on the TCP wire: node 1's worker is killed while node 0 decodes.
    Node 0's rank sees the connection close in its next all-reduce: both launchers exit 1 within the
    --timeout plus a few seconds, node 0 naming rank 1, and neither leaves a worker behind."""
    common = ["generate", "-m", str(smollm2_path), "-p", PROMPT, "-n", "2000", "-c", "4096", "--temp", "0",
              "--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", _free_port(),
              "--threads", "1", "--timeout", "20"]
    node0, node1 = start_cli(*common, "--node-rank", "0"), start_cli(*common, "--node-rank", "1")
    try:
        node0.out.wait_for(lambda s: len(s) > 0, 180, "generated text")            # decoding
        (worker,) = wait_for_workers(node1.pid, 1).values()
        os.kill(worker, signal.SIGKILL)
        code0, err0, took0 = node0.finish(20 + 10)
        code1, err1, _ = node1.finish(15)
    finally:
        node0.kill()
        node1.kill()
    assert code0 == 1 and took0 < 20, (took0, err0)
    last = [ln for ln in err0.splitlines() if ln.startswith("tensorsplit:")][-1]
    assert last.startswith("tensorsplit: rank 0 failed: rank 1 (node 1) closed its connection during"), err0
    assert "Traceback" not in err0
    assert code1 == 1 and "tensorsplit: rank 1 failed: killed by SIGKILL" in err1, err1
    for node in (node0, node1):
        assert_all_gone(node.pid)


def _perplexity(model, *args: str) -> float:
    r = run_cli("perplexity", "-m", str(model), "-f", str(ROOT / "tests/fixtures/english.txt"), "-c", "512",
                "--chunks", "2", "--threads", "1", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["ppl"]


def test_q8_wire_perplexity_stays_within_half_a_percent(smollm2_path):
    """--wire q8 rounds each node's part of every all-reduce to q8_0 blocks between two loopback nodes: the
    perplexity stays within 0.5% of one rank's (on 8 chunks: -0.08% for SmolLM2, -0.05% for Gemma 3; bf16
    +0.19%, -0.17%), and is not that of the unrounded sum (the wire does round)."""
    single = _perplexity(smollm2_path, "--nproc-per-node", "1")
    port = _free_port()
    common = ["perplexity", "-m", str(smollm2_path), "-f", str(ROOT / "tests/fixtures/english.txt"), "-c", "512",
              "--chunks", "2", "--threads", "1", "--json", "--nnodes", "2", "--nproc-per-node", "1",
              "--master-addr", "127.0.0.1", "--master-port", port, "--wire", "q8"]
    node1 = start_cli(*common, "--node-rank", "1")
    try:
        node0 = run_cli(*common, "--node-rank", "0")
        code1, err1, _ = node1.finish(60)
    finally:
        node1.kill()
    assert node0.returncode == 0 and code1 == 0, node0.stderr + err1
    q8 = json.loads(node0.stdout)["ppl"]
    assert q8 != single and abs(q8 / single - 1) < 0.005, (q8, single)
    bad = run_cli("generate", "-m", str(smollm2_path), "-p", "x", "--wire", "bf16", "--wire-transport", "gloo")
    assert bad.returncode == 1 and "--wire bf16 is sent by --wire-transport tcp only" in bad.stderr, bad.stderr


@pytest.mark.slow
def test_multinode_bench_script_prints_its_table_and_cleans_up(smollm2_path):
    """scripts/multinode_bench.sh on SmolLM2 with the smallest settings: the table has the one-host row
    and a row per mode with its ratio, and no namespace of the script is left afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the script makes network namespaces: root and iproute2 needed")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two hosts of one thread need 2 usable cores")
    env = {**os.environ, "SHAPES": "none", "MODES": "tcp tcp/q8", "COMM": "0", "REPS": "1", "PROMPT": "4",
           "GEN": "4", "PY": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "scripts/multinode_bench.sh"), str(smollm2_path)], capture_output=True,
                       text=True, env=env, timeout=300)
    if r.returncode != 0 and "Operation not permitted" in r.stderr:
        pytest.skip(f"this machine forbids network namespaces: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert rows[0].startswith("| link | between hosts") and rows[2].startswith("| one host | - |")
    assert [ln.split(" | ")[1] for ln in rows[3:]] == ["tcp", "tcp/q8"], r.stdout
    assert all(ln.rstrip(" |").endswith("x") for ln in rows[2:])
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tsbA" not in left and "tsbB" not in left, left

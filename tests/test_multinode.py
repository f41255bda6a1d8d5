"""Multi-node worlds: two real hosts as two network namespaces joined by a veth pair, one node
each; arrival timeouts and agreement checks between nodes.

The namespaces are made by the test itself (root and iproute2 needed); where the machine
forbids them, the namespace test says so and skips.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from cli_helpers import ROOT, run_cli

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
                raise PermissionError(f"ip {' '.join(s)}: {r.stderr.strip()}")

    def popen(self, ns: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "tensorsplit", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    def close(self):
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def netns():
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 to make network namespaces")
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
    single = run_cli("generate", "-m", str(smollm2_path), *GEN, "--nproc-per-node", str(2 * per_node),
                     "--threads", "1")
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
    assert out1.strip() == ""          # the coordinator and its output live on node 0


def test_missing_node_is_named_after_the_timeout(smollm2_path):
    t0 = time.monotonic()
    r = run_cli("generate", "-m", str(smollm2_path), "-p", "x", "--nnodes", "2", "--node-rank", "0",
                "--nproc-per-node", "1", "--master-port", "29614", "--timeout", "3")
    assert r.returncode == 1
    assert "tensorsplit: rank 0 failed: rank(s) 1 did not join within 3 s (node(s) 1" in r.stderr
    assert time.monotonic() - t0 < 60


def test_nodes_that_disagree_fail_fast_with_both_values(smollm2_path, tmp_path):
    common = ["generate", "-m", str(smollm2_path), "-p", "x", "--nnodes", "2", "--nproc-per-node", "1",
              "--master-port", "29615", "--timeout", "30"]
    node1 = subprocess.Popen([sys.executable, "-m", "tensorsplit", *common, "--node-rank", "1", "--split", "3,1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    r0 = run_cli(*common, "--node-rank", "0", "--split", "1,1")
    _, err1 = node1.communicate(timeout=60)
    msg = "disagrees with rank 0 on split: [0.75, 0.25] vs [0.5, 0.5]"
    assert r0.returncode == 1 and msg in r0.stderr
    assert node1.returncode == 1 and msg in err1

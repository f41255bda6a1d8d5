"""The wire between nodes: one TCP connection per pair of node leaders, driven by the calling thread
(kernels/csrc/wire.cpp has the protocol).

Why not Gloo for this one collective: between two hosts whose round trip is 50 us, Gloo's all-reduce of
a 16 KB hidden state takes 1-2 ms. Each of its messages passes from the caller to a Gloo worker thread,
through Gloo's I/O thread and back, and every wake-up costs tens of microseconds on a VM (`perf stat`:
14 context switches per 16 KB all-reduce). A layer makes two all-reduces. Here the caller sends and
spins on its own sockets, so a message costs what the link costs. Everything else (rendezvous, process
groups, barriers, timeouts, teardown) stays torch.distributed's, and `--wire-transport gloo` keeps Gloo
for this collective too.

Set-up, through the torch.distributed store (every node's leader, local rank 0, takes part):
  - each leader listens on an ephemeral port of the address that routes to --master-addr, and posts
    "address:port" under ts/wire/<node>;
  - node i connects to every node j < i and sends a hello (magic, the world's token, i); it accepts
    one connection from every node j > i and checks its hello; the token, made by node 0 and posted
    in the store, keeps a stray connection out;
  - the sockets (TCP_NODELAY) go to the native library, which owns and closes them.
"""
from __future__ import annotations

import re
import secrets
import socket
import struct
import time

import torch

from ..errors import TensorsplitError, collective_call
from .netif import local_address_for

HELLO = struct.Struct("<8s16sq")          # magic, the world's token, the connecting node
MAGIC = b"tshello1"
TRANSPORTS = ("tcp", "gloo")
# --wire: what an all-reduce sends of each node's part (the codes of csrc/wire.cpp's WireFormat). f32: as it
# is (the float64 partial sums, no rounding); bf16: 2 bytes a value; q8: q8_0 blocks, 34 bytes per 32
WIRE_FORMATS = {"f32": 0, "bf16": 1, "q8": 2}
BUFFER_BYTES = 4 << 20                    # socket buffers: a prefill chunk's all-reduce in one go


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("closed")
        data += part
    return data


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, BUFFER_BYTES)
        except OSError:
            pass


class WireMesh:
    """The node leaders' connections: all_reduce, broadcast and gather of CPU tensors between nodes."""

    def __init__(self, handle: int, node: int, n_nodes: int, local_world: int, timeout_s: float, wire: str = "f32"):
        self.handle, self.node, self.n_nodes, self.timeout_s = handle, node, n_nodes, timeout_s
        self.format = WIRE_FORMATS[wire]
        self.local_world = local_world          # ranks per node: node k's leader is rank k * local_world
        self.ops = torch.ops.tensorsplit

    @staticmethod
    def open(store, node: int, n_nodes: int, master_addr: str, timeout_s: float, local_world: int = 1,
             wire: str = "f32") -> "WireMesh":
        """Connect this node's leader to every other node's leader; every leader must call this."""
        deadline = time.monotonic() + timeout_s
        address = local_address_for(socket.gethostbyname(master_addr)) or "127.0.0.1"
        if node == 0:
            store.set("ts/wire/token", secrets.token_bytes(16))
        token = store.get("ts/wire/token")
        listener = socket.create_server((address, 0), backlog=n_nodes)
        listener.settimeout(1.0)
        socks: dict[int, socket.socket] = {}
        try:
            store.set(f"ts/wire/{node}", f"{address}:{listener.getsockname()[1]}")
            for peer in range(node):                            # connect to the nodes before this one
                host, port = store.get(f"ts/wire/{peer}").decode().rsplit(":", 1)
                try:
                    sock = socket.create_connection((host, int(port)), timeout=max(1.0, deadline - time.monotonic()))
                except OSError as e:
                    raise TensorsplitError(f"node {node}: cannot connect to node {peer}'s wire at {host}:{port} "
                                           f"({e.strerror or e})") from None
                sock.sendall(HELLO.pack(MAGIC, token, node))
                socks[peer] = sock
            while len(socks) < n_nodes - 1:                     # accept the nodes after this one
                if time.monotonic() > deadline:
                    missing = sorted(set(range(node + 1, n_nodes)) - set(socks))
                    raise TensorsplitError(f"node {node}: node(s) {', '.join(map(str, missing))} did not connect to "
                                           f"its wire within {timeout_s:g} s")
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    continue
                sock.settimeout(max(1.0, deadline - time.monotonic()))
                try:
                    magic, their_token, peer = HELLO.unpack(_recv_exactly(sock, HELLO.size))
                except (OSError, ConnectionError, struct.error):
                    sock.close()
                    continue
                if magic != MAGIC or their_token != token or not node < peer < n_nodes or peer in socks:
                    sock.close()                                 # not one of this world's nodes
                    continue
                socks[peer] = sock
            fds = []
            for peer in range(n_nodes):
                if peer == node:
                    fds.append(-1)
                    continue
                sock = socks[peer]
                sock.settimeout(None)
                _tune(sock)
                fds.append(sock.detach())
            socks.clear()
            return WireMesh(torch.ops.tensorsplit.wire_attach(fds, node), node, n_nodes, local_world, timeout_s, wire)
        finally:
            listener.close()
            for sock in socks.values():
                sock.close()

    def _ranks(self, message: str) -> str:
        """The op names nodes; say which ranks speak for them (each node's leader)."""
        def leaders(m: re.Match) -> str:
            nodes = [int(k) for k in m.group(2).split(",")]
            ranks = ", ".join(str(k * self.local_world) for k in nodes)
            return f"rank{'s' if len(nodes) > 1 else ''} {ranks} (node{'s' if len(nodes) > 1 else ''} {m.group(2)})"
        return re.sub(r"node(\(s\))? (\d+(?:, \d+)*)", leaders, message.removeprefix("wire: "))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum float32/float64 x over the nodes in place, in node order: every node gets the same bits. Each
        node's part crosses as the mesh's --wire format has it (its own part too, so that all sum alike)."""
        return collective_call(self._ranks, self.ops.wire_all_reduce.default,
                               x, self.handle, self.timeout_s, self.format)

    def broadcast(self, x: torch.Tensor, root: int = 0, idle: bool = False) -> torch.Tensor:
        """Copy node `root`'s x into every node's x (same shape and dtype everywhere)."""
        return collective_call(self._ranks, self.ops.wire_broadcast.default, x, self.handle, root, self.timeout_s, idle)

    def gather(self, x: torch.Tensor, root: int = 0) -> torch.Tensor:
        """(n_nodes, *x.shape) on node `root`; an empty tensor elsewhere."""
        return collective_call(self._ranks, self.ops.wire_gather.default,
                               x.contiguous(), self.handle, root, self.timeout_s)

    def wait_ns(self) -> int:
        return int(self.ops.wire_wait_ns.default(self.handle))

    def close(self) -> None:
        if self.handle is not None:
            self.ops.wire_detach.default(self.handle)
            self.handle = None

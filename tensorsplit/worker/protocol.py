"""The coordinator -> worker step messages: fixed-layout int64 tensors, never pickled.

A message is a header of HEADER_LEN int64 followed, for FORWARD, by a payload of
3 * n_tokens + n_rows int64: token ids, positions, slot ids, then the indices of the tokens
whose logits the coordinator wants. COMM_BENCH (`bench --comm`) has no payload: its header is
[op, elements, iterations, path] and every rank times that many all-reduces. PROFILE (`bench
--profile`) has none either: [op, reset, 0, 0], and every rank sends rank 0 its step profile
(worker/profile.py) as a float64 vector, then starts a new one if reset is 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

HEADER_LEN = 4
OP_FORWARD, OP_SHUTDOWN, OP_COMM_BENCH, OP_PROFILE = 1, 2, 3, 4
# the world's own all-reduce, plain Gloo over the device group, or one of comm/gloo_algorithms.py's
COMM_PATHS = ("auto", "gloo", "exchange", "doubling", "all_gather")


@dataclass
class Step:
    ids: torch.Tensor         # (n,) int64 token ids
    positions: torch.Tensor   # (n,) int64 position of each token in its sequence
    slots: torch.Tensor       # (n,) int64 KV-cache slot (sequence) of each token
    logit_rows: torch.Tensor  # (m,) int64 indices into the n tokens

    def header(self) -> torch.Tensor:
        return torch.tensor([OP_FORWARD, self.ids.numel(), self.logit_rows.numel(), 0], dtype=torch.int64)

    def payload(self) -> torch.Tensor:
        return torch.cat([self.ids, self.positions, self.slots, self.logit_rows]).to(torch.int64)

    @staticmethod
    def from_payload(header: torch.Tensor, payload: torch.Tensor) -> "Step":
        n, m = int(header[1]), int(header[2])
        assert payload.numel() == 3 * n + m, (payload.numel(), n, m)
        return Step(payload[:n], payload[n:2 * n], payload[2 * n:3 * n], payload[3 * n:])


def shutdown_header() -> torch.Tensor:
    return torch.tensor([OP_SHUTDOWN, 0, 0, 0], dtype=torch.int64)


def comm_bench_header(n_elems: int, iters: int, path: str) -> torch.Tensor:
    return torch.tensor([OP_COMM_BENCH, n_elems, iters, COMM_PATHS.index(path)], dtype=torch.int64)


def profile_header(reset: bool) -> torch.Tensor:
    return torch.tensor([OP_PROFILE, int(reset), 0, 0], dtype=torch.int64)


def empty_header() -> torch.Tensor:
    return torch.zeros(HEADER_LEN, dtype=torch.int64)


def payload_len(header: torch.Tensor) -> int:
    return 3 * int(header[1]) + int(header[2]) if int(header[0]) == OP_FORWARD else 0

"""Copy one rank's slices out of the memory-mapped GGUF file, as the shard plan says.

Only the planned bytes are copied: a row-split weight is a contiguous run of whole rows (whole
blocks), or for a fused weight several runs concatenated in plan order; a column-split weight
takes whole blocks from each row. Quantized weights stay quantized (`QWeight`): in the layout the
rank's kernels multiply (GGUF blocks; for the native CPU kernels the same blocks, 16 rows interleaved);
1-D tensors (norms, biases) are small and become float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

from ..kernels.base import Kernels
from ..kernels.layout import FORMATS, tiled_bytes
from ..kernels.quants import QType, QWeight, dequantize, row_bytes
from .shard_plan import TensorSlice


def load_weight(gf, ts: TensorSlice, kernels: Kernels) -> QWeight:
    """The rank's part of a 2-D weight as a QWeight of shape (local rows, local cols), in the layout
    and on the device of the rank's kernels."""
    info = gf.tensors[ts.name]
    n_cols, n_rows = int(info.shape[0]), int(info.shape[1])
    rows = gf.tensor_bytes(ts.name).reshape(n_rows, row_bytes(info.qtype, n_cols))   # uint8 view, no copy
    w = _part(rows, info.qtype, n_cols, ts, ts.name)
    assert w.nbytes == ts.nbytes, (ts.name, w.nbytes, ts.nbytes)
    return kernels.load(w)


def load_router(gf, ts: TensorSlice, kernels: Kernels) -> QWeight | torch.Tensor:
    """A mixture of experts' router: an F32 one as a float64 (n_expert, n_embd) tensor on the kernels'
    device (its logits are then summed wide whatever the batch, thread count or device, and every rank
    rounds them alike: the ranks must choose the same experts); any other type as a weight."""
    w = load_weight(gf, ts, kernels)
    if w.qtype == QType.F32:
        return w.data.to(torch.float64)
    return w


def load_experts(gf, ts: TensorSlice, kernels: Kernels) -> list[QWeight | None]:
    """The rank's part of a 3-D expert tensor [n_cols, n_rows, n_expert]: per expert a QWeight cut as
    the slice says (None where the rank holds none of it), in the kernels' layout. Each expert is
    copied out and converted in turn: never more than one expert's GGUF copy besides the result."""
    out, copied = _experts(gf, ts, kernels, 0)
    assert copied == ts.nbytes, (ts.name, copied, ts.nbytes)
    return out


def load_gate_up_experts(gf, ts: TensorSlice, kernels: Kernels) -> tuple[list, list]:
    """The rank's part of a fused ffn_gate_up_exps [n_cols, 2 n_ff_exp, n_expert]: (gate, up), each per
    expert a QWeight of the rank's rows of that half, as load_experts gives them from separate tensors."""
    n_ff_exp = int(gf.tensors[ts.name].shape[1]) // 2
    gate, copied_gate = _experts(gf, ts, kernels, 0, "gate")
    up, copied_up = _experts(gf, ts, kernels, n_ff_exp, "up")
    assert copied_gate + copied_up == ts.nbytes, (ts.name, copied_gate + copied_up, ts.nbytes)
    return gate, up


def _experts(gf, ts: TensorSlice, kernels: Kernels, row_offset: int, half: str = "") -> tuple[list, int]:
    """Per expert its rows / columns [a, b) of the slice (rows shifted by row_offset) -> (weights, bytes)."""
    info = gf.tensors[ts.name]
    n_cols, n_rows, n_expert = (int(d) for d in info.shape)
    mats = gf.tensor_bytes(ts.name).reshape(n_expert, n_rows, row_bytes(info.qtype, n_cols))
    out, copied = [], 0
    for e, (a, b) in enumerate(ts.expert_ranges):
        if a == b:
            out.append(None)
            continue
        rng = ((a + row_offset, b + row_offset),)
        part = _part(mats[e], info.qtype, n_cols, dataclasses.replace(ts, ranges=rng),
                     f"{ts.name}[{e}]{'.' + half if half else ''}")
        copied += part.nbytes
        out.append(kernels.load(part))
    assert len(out) == n_expert, (ts.name, len(out), n_expert)
    return out, copied


def load_expert_biases(gf, ts: TensorSlice, device="cpu") -> list[torch.Tensor | None]:
    """The rank's part of a 2-D expert bias [n_ff_exp, n_expert] (gpt-oss's gate/up biases): per expert
    its range of the hidden dim as float32 (None where the rank holds none of that expert)."""
    info = gf.tensors[ts.name]
    n, n_expert = (int(d) for d in info.shape)
    raw = np.array(gf.tensor_bytes(ts.name), copy=True).reshape(n_expert, -1)
    full = dequantize(torch.from_numpy(raw), info.qtype, n)                  # (n_expert, n_ff_exp) float32
    return [None if a == b else full[e, a:b].contiguous().to(device) for e, (a, b) in enumerate(ts.expert_ranges)]


def _part(rows: np.ndarray, qtype, n_cols: int, ts: TensorSlice, name: str) -> QWeight:
    """The slice's part of a (n_rows, row_bytes) matrix of file bytes, copied into a QWeight."""
    n_rows = rows.shape[0]
    if ts.axis == 1:
        runs = [rows[a:b] for a, b in ts.ranges]                  # views; concatenate copies once
        raw, shape = (runs[0] if len(runs) == 1 else np.concatenate(runs)), (ts.length, n_cols)
    elif ts.axis == 0:
        b0, b1 = row_bytes(qtype, ts.start), row_bytes(qtype, ts.end)
        raw, shape = rows[:, b0:b1], (n_rows, ts.end - ts.start)
    else:
        raw, shape = rows, (n_rows, n_cols)
    return QWeight.from_numpy(raw, qtype, shape[0], shape[1], name=name)


def load_vector(gf, ts: TensorSlice, device="cpu") -> torch.Tensor:
    """A 1-D tensor (norm weight, bias, rope factors) or the rank's range of it, as float32."""
    info = gf.tensors[ts.name]
    n = int(info.shape[0])
    raw = np.array(gf.tensor_bytes(ts.name), copy=True).reshape(1, -1)   # writable copy: 1-D tensors are small
    full = dequantize(torch.from_numpy(raw), info.qtype, n)[0]    # (n,) float32; 1-D tensors are small
    part = full if ts.axis is None else torch.cat([full[a:b] for a, b in ts.ranges])
    return part.contiguous().to(device)


def resident_bytes(gf, slices, tiled: bool) -> int:
    """Bytes a rank holds after loading these slices: 2-D weights as loaded (the native kernels' tiled
    layout where `tiled` and the type has one; an F32 router in float64), 1-D tensors as float32. `tensorsplit info` reports it before loading."""
    total = 0
    for ts in slices:
        info = gf.tensors[ts.name]
        if ts.split == "exp_bias":                           # float32 per expert (load_expert_biases)
            total += 4 * sum(b - a for a, b in ts.expert_ranges)
            continue
        if len(info.shape) < 2 or int(info.shape[1]) == 1:
            total += 4 * (ts.length if ts.axis is not None else int(info.shape[0]))
            continue
        n_cols, n_rows, n_mats = int(info.shape[0]), int(info.shape[1]), math.prod(int(d) for d in info.shape[2:])
        if ts.expert_ranges:                                  # per expert, as load_experts holds them
            tiled_type = tiled and int(info.qtype) in FORMATS
            halves = 2 if ts.split == "exp_gate_up_rows" else 1     # gate and up held apart
            for a, b in ts.expert_ranges:
                rows, cols = (b - a, n_cols) if ts.axis == 1 else (n_rows, b - a)
                if a < b:
                    total += halves * (tiled_bytes(info.qtype, rows, cols) if tiled_type
                                       else rows * row_bytes(info.qtype, cols))
            continue
        if ts.axis == 1:
            n_rows = ts.length
        elif ts.axis == 0:
            n_cols = ts.length
        if ts.split == "router" and info.qtype == QType.F32:
            total += 2 * ts.nbytes                            # held in float64 (load_router)
            continue
        total += (n_mats * tiled_bytes(info.qtype, n_rows, n_cols) if tiled and int(info.qtype) in FORMATS
                  else ts.nbytes)
    return total


class LoadProgress:
    """Counts loaded bytes; calls `on_step(done_bytes, total_bytes, name)` after each tensor."""

    def __init__(self, total: int, on_step: Callable[[int, int, str], None] | None):
        self.total, self.done, self.on_step = total, 0, on_step

    def step(self, ts: TensorSlice) -> None:
        self.done += ts.nbytes
        if self.on_step:
            self.on_step(self.done, self.total, ts.name)

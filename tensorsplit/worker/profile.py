"""Where a rank's decode step goes (`tensorsplit bench --profile`): time per part, summed over steps.

A profiled world wraps each rank's kernels in `Profiling` and times its all-reduces, its logits
gather and its step messages; the rest of a step is host time: Python, torch's eager ops (reshapes,
the embedding's dequantization, the router's top-k), and the calls between them. The parts:

  matmul            the quantized matmuls, the activations' 8-bit quantization and the experts
  attention         the attention op (it also writes the step's keys and values to the cache)
  elementwise       rms_norm (with the residual add), rope and the FFN's activation
  get_rows          the embedding lookup
  all_reduce_work   the all-reduce's copies and sums, and its call (all of it for a Gloo path, which
                    does not report its waits)
  all_reduce_wait   spinning for the other ranks of the node to post their part (shared memory), and on
                    a node's leader the exchange with the other nodes (the wire, the link's time included)
  logits_gather     the vocabulary slices to rank 0
  step_message      the step's token ids to every rank (its payload; a worker's wait for the next
                    step's header is idle time, not the step's)
  sampling          rank 0: choosing the next token from the logits
  host              the step's time that none of the above holds

Timing costs about half a microsecond per wrapped call, which lands in `host`: a profile shows a
little more host time than an unprofiled run has. A decode step replayed from C++
(model/step_program.py) calls no Python kernels: its calls are timed in C++ and shared out by
operator (REPLAYED_PARTS); its other calls (residual adds, reshapes) and the dispatch between them
are host time.
"""
from __future__ import annotations

import time

import torch

PARTS = ("matmul", "attention", "elementwise", "get_rows", "all_reduce_work", "all_reduce_wait", "logits_gather",
         "step_message", "sampling", "host")
_INDEX = {p: i for i, p in enumerate(PARTS)}
# the operators of a replayed step that belong to a part
REPLAYED_PARTS = {"tensorsplit::matmul_q8": "matmul", "tensorsplit::matmul_f32": "matmul",
                  "tensorsplit::quantize_matmul_q8": "matmul", "tensorsplit::experts": "matmul",
                  "tensorsplit::quantize_act": "matmul", "tensorsplit::group_sums": "matmul",
                  "tensorsplit::attention": "attention", "tensorsplit::rms_norm": "elementwise",
                  "tensorsplit::rope": "elementwise", "tensorsplit::add_rms_norm": "elementwise",
                  "tensorsplit::qkv_heads": "elementwise", "tensorsplit::glu": "elementwise",
                  "aten::silu": "elementwise", "aten::gelu": "elementwise",
                  "tensorsplit::unpack_rows": "get_rows", "tensorsplit::shm_all_reduce": "all_reduce_work",
                  "tensorsplit::wire_all_reduce": "all_reduce_work", "tensorsplit::shm_broadcast": "all_reduce_work"}
STEP = len(PARTS)            # the vector's last two entries: the steps' total time and their count
COUNT = STEP + 1
LENGTH = COUNT + 1


class StepProfile:
    """Nanoseconds per part (PARTS), the steps' total, and the number of steps, as one float64 vector: the
    form every rank sends rank 0."""

    def __init__(self, wait_ns=None):
        """wait_ns: () -> the nanoseconds the rank's all-reduces have waited so far, where its path
        reports them (shared memory); that much of all_reduce_work is all_reduce_wait."""
        self._wait_ns, self._replayed_ns = wait_ns, None
        self.reset()

    def count_replays(self, replayed_ns) -> None:
        """replayed_ns: () -> {operator: ns} of the replayed steps since its last call (RankModel.replayed_ns)."""
        self._replayed_ns = replayed_ns

    def add(self, part: str, ns: int) -> None:
        self._acc[_INDEX[part]] += ns

    def timed(self, part: str, fn, *args, **kw):
        """fn(*args, **kw), its time added to `part`."""
        t = time.perf_counter_ns()
        out = fn(*args, **kw)
        self._acc[_INDEX[part]] += time.perf_counter_ns() - t
        return out

    def extend(self, part: str, ns: int) -> None:
        """ns of `part` after the step ended (rank 0's sampling): the step grows by as much."""
        self._acc[_INDEX[part]] += ns
        self._acc[STEP] += ns

    def step(self, ns: int) -> None:
        """One step of ns nanoseconds ended: what no part holds is host time."""
        self._acc[STEP] += ns
        self._acc[COUNT] += 1

    def vector(self) -> torch.Tensor:
        """(LENGTH,) float64: parts, step total, step count; host = total - the other parts."""
        if self._replayed_ns is not None:
            for op, ns in self._replayed_ns().items():
                if op in REPLAYED_PARTS:
                    self._acc[_INDEX[REPLAYED_PARTS[op]]] += int(ns)
        v = torch.tensor(self._acc, dtype=torch.float64)
        if self._wait_ns is not None:
            waited = self._wait_ns() - self._wait_base
            v[_INDEX["all_reduce_wait"]] = waited
            v[_INDEX["all_reduce_work"]] -= waited
        v[_INDEX["host"]] = v[STEP] - v[: _INDEX["host"]].sum()
        return v

    def reset(self) -> None:
        self._acc = [0] * LENGTH        # Python ints while steps run: no tensor op per timed call
        self._wait_base = self._wait_ns() if self._wait_ns is not None else 0
        if self._replayed_ns is not None:
            self._replayed_ns()         # drained: what was replayed before the reset is not counted


def timed(profile: StepProfile | None, part: str, fn, *args):
    """fn(*args), timed into `part` when there is a profile (a profiled world), else just called."""
    return fn(*args) if profile is None else profile.timed(part, fn, *args)


def per_step_us(v: torch.Tensor) -> dict:
    """A rank's vector as microseconds per step: {"step_us", "parts_us": {part: us}}."""
    n = max(float(v[COUNT]), 1.0)
    return {"steps": int(v[COUNT]), "step_us": float(v[STEP]) / n / 1e3,
            "parts_us": {p: float(v[i]) / n / 1e3 for i, p in enumerate(PARTS)}}


class Profiling:
    """The kernels `inner`, each call timed into `profile` (matmul, attention, elementwise, get_rows)."""

    def __init__(self, inner, profile: StepProfile):
        self.inner, self.profile = inner, profile

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _timed(self, part: str, fn, *args, **kw):
        return self.profile.timed(part, fn, *args, **kw)

    def matmul(self, x, w, wide: bool = False):
        return self._timed("matmul", self.inner.matmul, x, w, wide)

    def prepare(self, inp, w) -> None:
        return self._timed("matmul", self.inner.prepare, inp, w)

    def experts(self, *args, **kw):
        return self._timed("matmul", self.inner.experts, *args, **kw)

    def attend(self, *args, **kw):
        return self._timed("attention", self.inner.attend, *args, **kw)

    def attend_static(self, *args, **kw):
        return self._timed("attention", self.inner.attend_static, *args, **kw)

    def rms_norm(self, x, weight, eps):
        return self._timed("elementwise", self.inner.rms_norm, x, weight, eps)

    def rope(self, *args, **kw):
        return self._timed("elementwise", self.inner.rope, *args, **kw)

    def add_rms_norm(self, *args, **kw):
        return self._timed("elementwise", self.inner.add_rms_norm, *args, **kw)

    def qkv_heads(self, *args, **kw):
        return self._timed("elementwise", self.inner.qkv_heads, *args, **kw)

    def glu(self, *args, **kw):
        return self._timed("elementwise", self.inner.glu, *args, **kw)

    def activation(self, name: str):
        fn = self.inner.activation(name)
        return lambda *a, **kw: self._timed("elementwise", fn, *a, **kw)

    def get_rows(self, w, ids):
        return self._timed("get_rows", self.inner.get_rows, w, ids)

"""Decode steps replayed from C++ on a CPU rank: the CPU counterpart of CUDA graph replay.

A small model's decode step is mostly host time: some 290 operator calls for SmolLM2 (850 before the
model fused its calls), each a few microseconds of Python and dispatch around a kernel that may take
less. So the first step of each
shape (tokens, logit rows) runs under a recorder (a TorchDispatchMode) that writes down every
operator call the Python model makes, as the dispatcher sees it: aten ops, the native kernels, the
all-reduce. Later steps of that shape replay the list from C++ (kernels/csrc/replay.cpp) through
the same dispatcher, with the step's ids, positions, slots and logit rows as its inputs, and no
Python between the calls; each tensor is dropped after its last reader. A call that returns its own
argument (a `.to()` that had nothing to do) is not recorded. The Python model stays the one
definition: what runs is what it called.

What makes a step unfit to replay, checked while recording (the step then stays eager, and so do
later steps of its shape):
  - an operator that returns something other than tensors (`.item()`, a shape read from data):
    the Python model decided something from the step's data, which a replay cannot redo;
  - an argument the encoder does not know (a type this module does not encode);
  - a tensor argument that no earlier call of the step made and that the model does not hold (its
    weights, caches, tables): data that reached the step some other way (a test's Python
    all-reduce, a tensor built from Python values) would be frozen into the program.
The cache's bounds are checked in Python before each step, recorded or replayed. A program holds
the model's weights and caches as constants: allocate_cache() drops every program.
"""
from __future__ import annotations

import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SLOT, CONST, INT, FLOAT, BOOL, NONE, INTS, STR, DEVICE, TENSORS = range(10)
MAX_TOKENS = 16                  # steps of up to this many tokens are recorded (decode, batched decode)
REPLAY_ENV = "TENSORSPLIT_REPLAY"   # 0: never replay (debugging, and the tests' eager reference)

_DTYPES = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4, torch.float16: 5,
           torch.float32: 6, torch.float64: 7, torch.bool: 11, torch.bfloat16: 15}
_LAYOUTS = {torch.strided: 0}
_FORMATS = {torch.contiguous_format: 0, torch.preserve_format: 1}


class Unreplayable(Exception):
    pass


def _constant_tables() -> list[torch.Tensor]:
    """The block decoders' constant tables (kernels/quants/_common.py const): constants of any step."""
    from ..kernels.quants._common import constants
    return constants()


def replay_enabled() -> bool:
    return os.environ.get(REPLAY_ENV, "1") != "0"


class _Recorder(TorchDispatchMode):
    """Runs each call and appends it to the program `handle`, its tensors mapped to slots or constants."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in dynamo's disable unless told not to, and that imports
        # torch._dynamo (and sympy) at the first call: ~2.5 s of every worker's first step. No step is
        # compiled, so there is nothing for dynamo to skip
        return False

    def __init__(self, handle: int, inputs: list[torch.Tensor], held: set[int]):
        super().__init__()
        self.handle, self.ops, self.held = handle, torch.ops.tensorsplit, held
        self.tables = _constant_tables
        self.slots: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []       # every slotted tensor stays alive, so no id() is reused
        for t in inputs:
            self._slot(t)
        self.error: str | None = None
        self.names: list[str] = []              # each call's operator, for profiles

    def _slot(self, t: torch.Tensor) -> int:
        self.slots[id(t)] = len(self.keep)
        self.keep.append(t)
        return self.slots[id(t)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.error is None:
            try:
                self._append(func, args, kwargs, out)
            except Unreplayable as e:
                self.error = str(e)
        return out

    def _append(self, func, args, kwargs, out) -> None:
        schema = func._schema
        if isinstance(out, torch.Tensor) and not schema.is_mutable and \
                any(out is a for a in (*args, *kwargs.values())):
            return       # a call that returned its own argument (`.to()` of what x already is): nothing to replay
        kinds, ints, floats, strs, consts = [], [], [], [], []

        def tensor(t: torch.Tensor):
            s = self.slots.get(id(t))
            if s is not None:
                return SLOT, s
            if id(t) not in self.held and not any(t is c for c in self.tables()):
                raise Unreplayable(f"{func}: a tensor argument ({tuple(t.shape)}, {t.dtype}) that the step did "
                                   "not make and the model does not hold")
            return CONST, t

        for i, arg in enumerate(schema.arguments):
            if i < len(args):
                v = args[i]
            elif arg.name in kwargs:
                v = kwargs[arg.name]
            elif arg.has_default_value():
                v = arg.default_value
            else:
                raise Unreplayable(f"{func}: argument {arg.name} missing")
            if isinstance(v, torch.Tensor):
                k, x = tensor(v)
                kinds.append(k)
                (ints.append(x) if k == SLOT else consts.append(x))
            elif v is None:
                kinds.append(NONE)
            elif isinstance(v, bool):
                kinds.append(BOOL)
                ints.append(int(v))
            elif isinstance(v, int):
                kinds.append(INT)
                ints.append(v)
            elif isinstance(v, float):
                kinds.append(FLOAT)
                floats.append(v)
            elif isinstance(v, torch.dtype) and v in _DTYPES:
                kinds.append(INT)
                ints.append(_DTYPES[v])
            elif isinstance(v, torch.layout) and v in _LAYOUTS:
                kinds.append(INT)
                ints.append(_LAYOUTS[v])
            elif isinstance(v, torch.memory_format) and v in _FORMATS:
                kinds.append(INT)
                ints.append(_FORMATS[v])
            elif isinstance(v, torch.device):
                kinds.append(DEVICE)
                strs.append(str(v))
            elif isinstance(v, str):
                kinds.append(STR)
                strs.append(v)
            elif isinstance(v, (list, tuple)) and all(isinstance(e, torch.Tensor) for e in v) and \
                    (v or str(arg.type) == "List[Tensor]"):
                kinds.append(TENSORS)
                ints.append(len(v))
                for e in v:
                    k, x = tensor(e)
                    if k == SLOT:
                        ints.append(x)
                    else:
                        ints.append(-1)
                        consts.append(x)
            elif isinstance(v, (list, tuple)) and all(isinstance(e, int) and not isinstance(e, bool) for e in v):
                kinds.append(INTS)
                ints += [len(v), *v]
            else:
                raise Unreplayable(f"{func}: argument {arg.name} of type {type(v).__name__}")
        results = out if isinstance(out, (tuple, list)) and len(schema.returns) != 1 else (out,)
        outs = []
        for r in results:
            if isinstance(r, torch.Tensor):
                outs += [-1, self._slot(r)]
            elif isinstance(r, (list, tuple)) and all(isinstance(e, torch.Tensor) for e in r):
                outs.append(len(r))
                outs += [self._slot(e) for e in r]
            else:
                raise Unreplayable(f"{func} returns a {type(r).__name__}: the step reads its own data")
        if len(results) != len(schema.returns):
            raise Unreplayable(f"{func}: {len(results)} results for {len(schema.returns)} returns")
        self.ops.replay_op.default(self.handle, schema.name, schema.overload_name, kinds, ints, floats, strs, consts,
                                   outs)
        self.names.append(schema.name)


class StepProgram:
    """One recorded step: run(inputs) replays it and returns its output."""

    def __init__(self, handle: int, out_slot: int, names: list[str]):
        self.handle, self.out_slot, self.names = handle, out_slot, names
        self.ops = torch.ops.tensorsplit

    def run(self, inputs: list[torch.Tensor], timed: bool = False) -> torch.Tensor:
        return self.ops.replay_run.default(self.handle, inputs, self.out_slot, timed)

    def times(self) -> dict[str, float]:
        """ns per operator name, summed over the timed runs since the last call."""
        out: dict[str, float] = {}
        for name, ns in zip(self.names, self.ops.replay_times.default(self.handle).tolist()):
            out[name] = out.get(name, 0.0) + ns
        return out

    def __del__(self):
        try:
            self.ops.replay_free.default(self.handle)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def held_tensors(root) -> set[int]:
    """id() of every tensor reachable from `root` through attributes, lists, tuples and dicts."""
    held: set[int] = set()
    seen: set[int] = set()
    stack = [root]
    while stack:
        o = stack.pop()
        if id(o) in seen or o is None or isinstance(o, (str, bytes, int, float, bool, type)) or callable(o) and \
                not hasattr(o, "__dict__"):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            held.add(id(o))
        elif type(o).__module__.split(".")[0] == "torch":      # torch's own objects (op namespaces ...)
            continue
        elif isinstance(o, dict):
            stack += list(o.values())
        elif isinstance(o, (list, tuple, set)):
            stack += list(o)
        elif hasattr(o, "__dict__") or hasattr(type(o), "__slots__"):
            stack += list(getattr(o, "__dict__", {}).values())
            stack += [getattr(o, s) for s in getattr(type(o), "__slots__", ()) if hasattr(o, s)]
    return held


def record(fn, inputs: list[torch.Tensor], owner) -> tuple[torch.Tensor, StepProgram | None, str | None]:
    """Run fn(*inputs) once, recording it: (its output, the program or None, why not). The tensors
    `owner` holds (the model) are the program's only constants besides numbers."""
    ops = torch.ops.tensorsplit
    handle = ops.replay_new.default(len(inputs))
    rec = _Recorder(handle, inputs, held_tensors(owner))
    with rec:
        out = fn(*inputs)
    if rec.error is None and not (isinstance(out, torch.Tensor) and id(out) in rec.slots):
        rec.error = "the step's output was not made by a recorded call"
    if rec.error is not None:
        ops.replay_free.default(handle)
        return out, None, rec.error
    return out, StepProgram(handle, rec.slots[id(out)], rec.names), None


__all__ = ["record", "StepProgram", "MAX_TOKENS", "replay_enabled", "Unreplayable"]

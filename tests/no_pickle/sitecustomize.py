"""Test-only (tests/test_wire.py): forbids pickling in every Python process that has this folder on
PYTHONPATH, and logs to $TS_NO_PICKLE_LOG that it is in force and every attempt, before raising.
pickle's dump(s)/load(s) and its Pickler/Unpickler raise, and so do torch.distributed's object
collectives. Never on the path of a normal run."""
import importlib.machinery
import os
import pickle
import sys
import traceback

_LOG = os.environ["TS_NO_PICKLE_LOG"]


def _log(line: str) -> None:
    with open(_LOG, "a") as f:
        f.write(line.replace("\n", " | ") + "\n")


class PickleForbidden(RuntimeError):
    pass


def _refuse(what: str):
    _log(f"CALLED {what} in pid {os.getpid()}: {''.join(traceback.format_stack(limit=6))}")
    raise PickleForbidden(f"{what}: pickling is forbidden in this test world")


def _refusing(what: str):
    def refuse(*args, **kwargs):
        _refuse(what)
    return refuse


class _Pickler(pickle.Pickler):        # subclasses (multiprocessing's ForkingPickler) still import
    def __init__(self, *args, **kwargs):
        _refuse("pickle.Pickler")


class _Unpickler(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
        _refuse("pickle.Unpickler")


for _name in ("dump", "dumps", "load", "loads"):
    setattr(pickle, _name, _refusing("pickle." + _name))
pickle.Pickler, pickle.Unpickler = _Pickler, _Unpickler

OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
                      "send_object_list", "recv_object_list")


class _PatchC10d(importlib.machinery.PathFinder):
    """Replaces the object collectives when torch.distributed.distributed_c10d is first imported,
    before torch.distributed copies its names."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "torch.distributed.distributed_c10d":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for fn in OBJECT_COLLECTIVES:
                setattr(module, fn, _refusing("torch.distributed." + fn))
        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchC10d)
with open("/proc/self/cmdline", "rb") as _f:
    _log(f"installed in pid {os.getpid()}: {_f.read().replace(bytes(1), b' ').decode(errors='replace')}")

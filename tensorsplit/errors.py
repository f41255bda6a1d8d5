"""Typed errors for users. The CLI prints str(error) as one line and exits non-zero.

Internal invariants use `assert`; anything a user can cause (a bad file, a bad flag, a
plan that cannot be made) raises one of these with the offending file, field, tensor or
rank in the message.
"""
from __future__ import annotations


class TensorsplitError(Exception):
    """Base of every user-facing error."""


class GGUFError(TensorsplitError):
    """The GGUF file is malformed or hostile. Names the file, the field or tensor, and what was expected."""

    def __init__(self, path: str, where: str, message: str):
        self.path, self.where = str(path), where
        super().__init__(f"{self.path}: {where}: {message}")


class UnsupportedError(TensorsplitError):
    """The file is well formed but uses something tensorsplit does not implement (architecture, quant type)."""


class ConfigError(TensorsplitError):
    """Metadata and tensors disagree, or a required metadata key is missing."""


class ShardPlanError(TensorsplitError):
    """The model cannot be split the way the user asked (world size, --split ratios)."""


class AutoSplitError(ShardPlanError):
    """--split auto cannot be resolved: the model does not fit the devices' free memory, their free memory
    cannot be read, or the world is one where the ranks could not agree on it (several nodes, torchrun)."""


class CollectiveError(TensorsplitError):
    """A collective could not complete because another rank died or stopped answering. Secondary: the
    launcher blames the rank that failed first, not the ones that noticed."""


def collective_call(describe, fn, *args):
    """fn(*args): a native collective (shared memory, the wire). Its RuntimeError becomes a CollectiveError
    of the message's first line as describe(line) rewrites it (the ops name local ranks or nodes; a user
    reads the world's ranks)."""
    try:
        return fn(*args)
    except RuntimeError as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveError(describe(text)) from None


class WorkerFailed(TensorsplitError):
    """A rank of a world whose rank 0 is this process (LLM, serve) died or stopped answering; the
    message names it, as the launcher's one line does."""

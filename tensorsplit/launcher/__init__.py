"""The launcher: one worker process per device, torchrun-style, watched and ended together."""
from ..spec import NodeSpec
from .spawn import Launch, default_nproc, launch

__all__ = ["Launch", "NodeSpec", "default_nproc", "launch"]

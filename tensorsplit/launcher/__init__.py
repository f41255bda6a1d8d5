"""The launcher: one worker process per device, torchrun-style, watched and ended together."""
from .spawn import Launch, NodeSpec, default_nproc, launch

__all__ = ["Launch", "NodeSpec", "default_nproc", "launch"]

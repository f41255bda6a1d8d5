"""The launcher: one worker process per device, torchrun-style, watched and ended together."""
from ..spec import NodeSpec
from .spawn import Launch, launch

__all__ = ["Launch", "NodeSpec", "launch"]

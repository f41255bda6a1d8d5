"""tensorsplit: tensor-parallel inference of GGUF language models across several devices."""
from __future__ import annotations

__all__ = ["LLM"]


def __getattr__(name: str):
    if name == "LLM":  # imported lazily: `import tensorsplit` stays light for the CLI
        from .api import LLM
        return LLM
    raise AttributeError(name)

"""The model core: GGUF reading, config, shard plan, quantized weights and one rank's forward pass.

Knows nothing of processes or text: a reduction callable is handed in, token ids come in and a
vocabulary slice of logits goes out.
"""
from __future__ import annotations

from pathlib import Path

from .config import ModelConfig, config_from_gguf
from .gguf_file import GGUFFile
from .shard_plan import ShardPlan, make_plan, parse_split
from .transformer import RankModel


def open_model(path: str | Path) -> tuple[GGUFFile, ModelConfig]:
    """Parse and validate the file, and build the config from its metadata."""
    gf = GGUFFile(path)
    return gf, config_from_gguf(gf.kv, gf.tensors)


__all__ = ["GGUFFile", "ModelConfig", "RankModel", "ShardPlan", "config_from_gguf", "make_plan",
           "open_model", "parse_split"]

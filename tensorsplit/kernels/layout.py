"""Python-side facts about the tiled weight layout of the native kernels (csrc/layout.h): which GGML types have it, the
tile geometry, and which activation quantization each type's integer kernel takes."""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as QType

TILE_ROWS = 16


@dataclass(frozen=True)
class Format:
    block: int         # elements per GGUF block (1 for F16/BF16: a "block" is one column)
    block_bytes: int   # bytes per GGUF block
    group: int         # elements per scale group (the activation sums are per group)
    tile_block: int    # bytes of 16 rows of one block column in the tiled layout
    act: str | None    # activation quantization of the integer kernel: "q8_0", "q8_1", "q8_k"; None: float
    has_min: bool = False   # a float offset per group (w = s * q + o): the kernel needs sum(x) per group


FORMATS: dict[int, Format] = {
    QType.Q4_0: Format(32, 18, 32, 288, "q8_0"),
    QType.Q4_1: Format(32, 20, 32, 320, "q8_1", True),
    QType.Q5_0: Format(32, 22, 32, 352, "q8_0"),
    QType.Q5_1: Format(32, 24, 32, 384, "q8_1", True),
    QType.Q8_0: Format(32, 34, 32, 544, "q8_0"),
    QType.IQ4_NL: Format(32, 18, 32, 288, "q8_0"),
    QType.Q2_K: Format(256, 84, 16, 1344, "q8_k", True),
    QType.Q3_K: Format(256, 110, 16, 1824, "q8_k"),
    QType.Q4_K: Format(256, 144, 32, 2368, "q8_k", True),
    QType.Q5_K: Format(256, 176, 32, 2880, "q8_k", True),
    QType.Q6_K: Format(256, 210, 16, 3360, "q8_k"),
    QType.IQ4_XS: Format(256, 136, 32, 2208, "q8_k"),
    # the E8M0 exponent bytes kept as they are (no f16 holds 2^-128 .. 2^127; csrc/layout.h MXFP4)
    QType.MXFP4: Format(32, 17, 32, 272, "q8_0"),
    QType.F16: Format(1, 2, 1, 32, None),
    QType.BF16: Format(1, 2, 1, 32, None),
}
FORMATS = {int(k): v for k, v in FORMATS.items()}

ACT_KINDS = {"q8_0": 0, "q8_1": 1, "q8_k": 2}   # csrc/layout.h ActKind

# IQ4_NL / IQ4_XS: the 16 non-linear levels a 4-bit code stands for (ggml's kvalues_iq4nl); the
# decoders (quants/formats_iq.py), the GPU kernels and csrc/ all use this table
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def n_tiles(n_rows: int) -> int:
    return -(-n_rows // TILE_ROWS)


def tiled_bytes(qtype: int, n_rows: int, n_cols: int) -> int:
    """Bytes of a weight in the tiled layout (rows padded to whole tiles)."""
    f = FORMATS[int(qtype)]
    return n_tiles(n_rows) * (n_cols // f.block) * f.tile_block

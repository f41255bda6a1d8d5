"""Quant-type facts: which GGML types tensorsplit supports, block geometry, row sizes.

Block geometry comes from gguf-py's GGML_QUANT_SIZES, so `block_info` / `row_bytes` also
answer for types we cannot dequantize (a file reader needs byte sizes for every tensor).
`check_supported` is the one place that raises UnsupportedError for a quant type.
"""
from __future__ import annotations

from gguf import GGMLQuantizationType as QType
from gguf.constants import GGML_QUANT_SIZES

from ...errors import UnsupportedError

SUPPORTED: frozenset[QType] = frozenset({
    QType.F32, QType.F16, QType.BF16,
    QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
    QType.IQ4_NL, QType.IQ4_XS, QType.MXFP4,
})

# float types: stored as dense (n_rows, n_cols) tensors of this dtype
FLOAT_TYPES: frozenset[QType] = frozenset({QType.F32, QType.F16, QType.BF16})


def type_name(qtype) -> str:
    """'Q4_K' for a QType or its int id; 'type id N' for an id GGML does not define."""
    try:
        return QType(int(qtype)).name
    except ValueError:
        return f"type id {int(qtype)}"


def _supported_list() -> str:
    return ", ".join(t.name for t in sorted(SUPPORTED, key=int))


def check_supported(qtype, name: str = "") -> QType:
    """Return qtype as a QType; raise UnsupportedError naming the tensor and type otherwise."""
    try:
        qt = QType(int(qtype))
    except ValueError:
        qt = None
    if qt is None or qt not in SUPPORTED:
        who = name or "<unnamed tensor>"
        raise UnsupportedError(
            f"{who}: quant type {type_name(qtype)} is not supported; supported: {_supported_list()}")
    return qt


def block_info(qtype) -> tuple[int, int]:
    """(block_size elements, type_size bytes). F32 -> (1, 4), F16/BF16 -> (1, 2)."""
    try:
        return GGML_QUANT_SIZES[QType(int(qtype))]
    except (ValueError, KeyError):
        raise UnsupportedError(f"quant type {type_name(qtype)} has no known block size") from None


def row_bytes(qtype, n_cols: int) -> int:
    """Bytes of one row of n_cols elements; n_cols must be a multiple of the block size."""
    bs, ts = block_info(qtype)
    if n_cols % bs:
        raise ValueError(f"{n_cols} columns is not a multiple of the {type_name(qtype)} block size {bs}")
    return n_cols // bs * ts

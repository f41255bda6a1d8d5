"""Quantized GGUF weights in torch: dequantization of F32/F16/BF16, legacy (Q4_0..Q8_0),
K-quant (Q2_K..Q6_K) and IQ4 (IQ4_NL, IQ4_XS) blocks, and matmul over weights kept quantized.

Modules: qtypes (type facts, errors), formats_* (block decoders), dequant (dispatch table),
qweight (QWeight, slice_cols), matmul (qmatmul, get_rows; its TILE_ELEMS bounds the tile),
fused (opt-in compiled dequantize-and-matvec for decode steps), paths (counts of which path,
eager or a fast kernel, computed each matmul), activations (opt-in llama.cpp-style rounding of
matmul inputs).
"""
from .dequant import DEQUANTIZERS, dequantize
from .fused import set_kernels
from .matmul import get_rows, qmatmul
from .qtypes import SUPPORTED, QType, block_info, check_supported, row_bytes
from .qweight import QWeight, slice_cols

__all__ = [
    "QType", "SUPPORTED", "block_info", "row_bytes", "check_supported",
    "dequantize", "DEQUANTIZERS", "QWeight", "slice_cols", "qmatmul", "get_rows", "set_kernels",
]

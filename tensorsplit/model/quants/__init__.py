"""Quantized GGUF weights in torch: dequantization of F32/F16/BF16, legacy (Q4_0..Q8_0),
K-quant (Q2_K..Q6_K) and IQ4 (IQ4_NL, IQ4_XS) blocks, and matmul over weights kept quantized.

Modules: qtypes (type facts, errors), formats_* (block decoders), dequant (dispatch table),
qweight (QWeight in GGUF or native layout, slice_cols), matmul (qmatmul, MatmulInput, get_rows:
the native kernels, or dequantized tiles of at most TILE_ELEMS elements on the torch path),
paths (counts of which path, native or torch, computed each matmul), activations (llama.cpp-style
rounding of matmul inputs on the torch path).
"""
from .dequant import DEQUANTIZERS, dequantize
from .matmul import MatmulInput, get_rows, qmatmul
from .qtypes import SUPPORTED, QType, block_info, check_supported, row_bytes
from .qweight import QWeight, slice_cols

__all__ = [
    "QType", "SUPPORTED", "block_info", "row_bytes", "check_supported",
    "dequantize", "DEQUANTIZERS", "QWeight", "slice_cols", "qmatmul", "MatmulInput", "get_rows",
]

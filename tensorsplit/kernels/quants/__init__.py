"""Quantized GGUF weights in torch: dequantization of F32/F16/BF16, legacy (Q4_0..Q8_0),
K-quant (Q2_K..Q6_K) and IQ4 (IQ4_NL, IQ4_XS) blocks, and the weight that keeps them.

Modules: qtypes (type facts, errors), formats_* (block decoders), dequant (dispatch table),
qweight (QWeight in GGUF or tiled layout, slice_cols), activations (llama.cpp-style rounding of
matmul inputs, for the reference kernels). The matmuls themselves are the kernels' (kernels/base.py).
"""
from .dequant import DEQUANTIZERS, dequantize
from .qtypes import SUPPORTED, QType, block_info, check_supported, row_bytes
from .qweight import QWeight, slice_cols

__all__ = [
    "QType", "SUPPORTED", "block_info", "row_bytes", "check_supported",
    "dequantize", "DEQUANTIZERS", "QWeight", "slice_cols",
]

"""Small torch helpers shared by the format decoders: device-cached constant tables,
byte reinterpretation (uint8 -> float16/float32/...) and nibble / bit unpacking.

Every helper works on whatever device its input lives on; constant tables are built once
per (values, dtype, device) and cached, so the hot path never copies from host.
"""
from __future__ import annotations

import functools

import torch


_CONSTANTS: list[torch.Tensor] = []     # every table const() made: constants of a recorded step too


@functools.lru_cache(maxsize=None)
def const(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D constant tensor, created once per device. Made outside any dispatch mode: a decode step being
    recorded (model/step_program.py) takes it as a constant, whichever step first asked for it."""
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        t = torch.tensor(values, dtype=dtype, device=device)
    _CONSTANTS.append(t)
    return t


def constants() -> list[torch.Tensor]:
    """The tables const() has made so far."""
    return list(_CONSTANTS)


def shifts(values: tuple, device: torch.device, shape: tuple) -> torch.Tensor:
    """uint8 shift amounts, reshaped for broadcasting, e.g. shifts((0, 4), dev, (1, 1, 2, 1))."""
    return const(values, torch.uint8, device).view(shape)


def bytes_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the last dim of a uint8 tensor as `dtype` (little-endian).

    (..., k * itemsize) uint8 -> (..., k) dtype. Copies first when strides or storage offset
    are not aligned for the wider dtype (torch's view(dtype) requires that).
    """
    size = torch.empty((), dtype=dtype).element_size()
    if size > 1 and (t.stride(-1) != 1 or t.storage_offset() % size
                     or any(s % size for s in t.stride()[:-1])):
        t = t.clone(memory_format=torch.contiguous_format)
    return t.view(dtype)


def f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of every block: (n_blocks, type_size) -> (n_blocks, 1) float32."""
    return bytes_as(blocks[:, offset:offset + 2], torch.float16).float()


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., k) uint8 -> (..., 2, k) uint8: [low nibbles, high nibbles] (ggml's 4-bit layout)."""
    q = qs.unsqueeze(-2) >> shifts((0, 4), qs.device, (2, 1))
    return q & 0x0F


def bits8(qh: torch.Tensor) -> torch.Tensor:
    """(..., k) uint8 -> (..., 8, k) uint8 in {0, 1}: [..., i, j] = bit i of byte j."""
    return (qh.unsqueeze(-2) >> shifts(tuple(range(8)), qh.device, (8, 1))) & 1


def crumbs(q: torch.Tensor) -> torch.Tensor:
    """(..., k) uint8 -> (..., 4, k) uint8: [..., i, j] = bits 2i..2i+1 of byte j."""
    return (q.unsqueeze(-2) >> shifts((0, 2, 4, 6), q.device, (4, 1))) & 3

"""A validating reader for GGUF files: header, metadata (key/values) and tensor table.

GGUF files are untrusted input. This module owns the one place where their bytes are
interpreted: it checks every count, length, type, shape and offset against the file
itself *before* trusting it (before allocating or looping on it), and only then exposes
the metadata and zero-copy views of the tensor data. Everything a malformed or hostile
file can cause ends in `tensorsplit.errors.GGUFError(path, where, message)`, where
`where` names the field, key or tensor and `message` says what was expected and found.

The checks follow llama.cpp's `gguf_init_from_file` (ggml/src/gguf.cpp) and go a little
further where the runtime needs it:

* header: magic "GGUF"; version 2 or 3 (1 is obsolete, a byte-swapped version means a
  big-endian file, which is not supported); the key/value and tensor counts must fit in
  the bytes that follow (a lower bound per entry, so a count of 2**60 fails at once);
* metadata: keys non-empty, valid UTF-8, no NUL, not duplicated; value types known;
  every string and array at most 1 GiB and inside the file, checked before reading it;
  nested arrays at most `MAX_ARRAY_NESTING` deep; `general.alignment`, if present, a
  uint32 power of two (default 32);
* tensor table: names valid UTF-8, no NUL, shorter than ggml's 64-byte limit, not
  duplicated; 1 to 4 dims, each below 2**63 (zero-size dims are allowed, as llama.cpp
  allows them); element count below 2**63; a known ggml type (one with a
  `GGML_QUANT_SIZES` entry; whether it can be *computed* is decided elsewhere) with
  ne[0] a multiple of its block size; each offset exactly the aligned running sum of the
  previous tensors' sizes (what GGUFWriter and llama.cpp produce and require: aligned,
  in order, no gaps, no overlaps); each tensor's data inside the file.

gguf-py is used only for constants; its reader accepts many malformed files.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from ..errors import GGUFError

__all__ = ["GGUFFile", "TensorInfo", "MAX_STRING_BYTES", "MAX_ARRAY_BYTES", "MAX_ARRAY_NESTING"]

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_STRING_BYTES = 1 << 30      # llama.cpp's GGUF_MAX_STRING_LENGTH
MAX_ARRAY_BYTES = 1 << 30       # our own cap on an array's encoded size
MAX_ARRAY_ELEMENTS = 1 << 30    # llama.cpp's GGUF_MAX_ARRAY_ELEMENTS
MAX_ARRAY_NESTING = 4           # llama.cpp rejects nested arrays; we parse a few levels, bounded
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64              # ggml stores names in char[64], NUL included
INT64_LIMIT = 1 << 63

_HEADER_BYTES = 4 + 4 + 8 + 8   # magic, version, n_tensors, n_kv
# Smallest possible encodings, used to bound counts before looping on them.
_MIN_KV_BYTES = 8 + 1 + 4 + 1           # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length (empty name), n_dims, one dim, type, offset
_MIN_ARRAY_HEADER_BYTES = 4 + 8         # element type, count

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Scalar(NamedTuple):
    fmt: struct.Struct
    dtype: np.dtype


_SCALARS: dict[GGUFValueType, _Scalar] = {
    GGUFValueType.UINT8: _Scalar(struct.Struct("<B"), np.dtype("<u1")),
    GGUFValueType.INT8: _Scalar(struct.Struct("<b"), np.dtype("<i1")),
    GGUFValueType.UINT16: _Scalar(struct.Struct("<H"), np.dtype("<u2")),
    GGUFValueType.INT16: _Scalar(struct.Struct("<h"), np.dtype("<i2")),
    GGUFValueType.UINT32: _Scalar(struct.Struct("<I"), np.dtype("<u4")),
    GGUFValueType.INT32: _Scalar(struct.Struct("<i"), np.dtype("<i4")),
    GGUFValueType.FLOAT32: _Scalar(struct.Struct("<f"), np.dtype("<f4")),
    # llama.cpp reads a bool as int8 and tests != 0; so do we (struct "?" would too).
    GGUFValueType.BOOL: _Scalar(struct.Struct("<B"), np.dtype("<u1")),
    GGUFValueType.UINT64: _Scalar(struct.Struct("<Q"), np.dtype("<u8")),
    GGUFValueType.INT64: _Scalar(struct.Struct("<q"), np.dtype("<i8")),
    GGUFValueType.FLOAT64: _Scalar(struct.Struct("<d"), np.dtype("<f8")),
}
_VALUE_TYPES = {int(t): t for t in GGUFValueType}
# "Known" ggml types: in the enum and with a block/type size (removed types have none).
_GGML_TYPES = {int(t): t for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # ggml order: shape[0] = ne[0] (innermost, the input dim of a weight)
    qtype: GGMLQuantizationType
    offset: int              # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _LazyArray(NamedTuple):
    """A numeric array seen during parsing; copied out only once the whole file validated,
    so that a hostile file cannot make us copy large arrays before it is rejected."""
    offset: int
    count: int
    vtype: GGUFValueType


def _pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


def _show(text: str | bytes, limit: int = 80) -> str:
    """A name for an error message: escaped and cut short (a hostile key may be 1 GiB)."""
    shown = repr(text[:limit])
    return shown + ("..." if len(text) > limit else "")


class _Reader:
    """Bounds-checked sequential reads over the mapped file. Every read states what it
    reads, so a failure can say where and what."""

    def __init__(self, path: Path, buf: Any, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def fail(self, where: str, message: str) -> NoReturn:
        raise GGUFError(self.path, where, message)

    def take(self, n: int, where: str, what: str) -> int:
        """Advance over n bytes; return where they start."""
        if n > self.remaining:
            self.fail(where, f"{what} needs {n} bytes at offset {self.pos}, "
                             f"but the file ends after {self.remaining} (file size {self.size}; truncated?)")
        start = self.pos
        self.pos += n
        return start

    def u32(self, where: str, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, where, what))[0]

    def u64(self, where: str, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, where, what))[0]

    def string_bytes(self, where: str, what: str, limit: int = MAX_STRING_BYTES) -> bytes:
        """A length-prefixed string's raw bytes, the length checked before anything is read."""
        n = self.u64(where, f"{what} length")
        if n > limit:
            self.fail(where, f"{what} length is {n} bytes; at most {limit} allowed")
        start = self.take(n, where, f"{what} ({n} bytes)")
        return bytes(self.buf[start:start + n])

    def name(self, where: str, what: str, limit: int = MAX_STRING_BYTES) -> str:
        """A key or tensor name: strict UTF-8 and no NUL (ggml compares names as C strings,
        so 'a\\0b' and 'a\\0c' would be the same name to llama.cpp)."""
        raw = self.string_bytes(where, what, limit)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(where, f"{what} is not valid UTF-8 ({e.reason} at byte {e.start}): {_show(raw)}")
        if "\0" in text:
            self.fail(where, f"{what} contains a NUL byte: {_show(text)}")
        return text


# --- metadata -----------------------------------------------------------------------------


def _value_type(r: _Reader, where: str, what: str) -> GGUFValueType:
    raw = r.u32(where, what)
    vtype = _VALUE_TYPES.get(raw)
    if vtype is None:
        r.fail(where, f"unknown {what} {raw}; expected one of "
                      f"{', '.join(f'{int(t)} ({t.name})' for t in GGUFValueType)}")
    return vtype


def _read_value(r: _Reader, vtype: GGUFValueType, where: str, depth: int) -> tuple[Any, Any]:
    """One value of a declared type. Returns (value, declared type for kv_types)."""
    scalar = _SCALARS.get(vtype)
    if scalar is not None:
        value = scalar.fmt.unpack_from(r.buf, r.take(scalar.fmt.size, where, f"{vtype.name} value"))[0]
        return (value != 0 if vtype is GGUFValueType.BOOL else value), vtype
    if vtype is GGUFValueType.STRING:
        return _decode_value(r.string_bytes(where, "string value")), vtype
    assert vtype is GGUFValueType.ARRAY
    return _read_array(r, where, depth + 1)


def _decode_value(raw: bytes) -> str:
    # GGUF says strings are UTF-8, but llama.cpp never checks values and some vocabularies
    # carry raw byte tokens. surrogateescape keeps every byte: s.encode("utf-8", "surrogateescape").
    return raw.decode("utf-8", "surrogateescape")


def _read_array(r: _Reader, where: str, depth: int) -> tuple[Any, tuple[GGUFValueType, GGUFValueType]]:
    if depth > MAX_ARRAY_NESTING:
        r.fail(where, f"arrays nested more than {MAX_ARRAY_NESTING} deep")
    elem = _value_type(r, where, "array element type")
    n = r.u64(where, "array length")
    # Bound the count by the smallest encoding of one element before reading any of them:
    # an array of 2**40 uint8 fails here, without allocating or looping.
    scalar = _SCALARS.get(elem)
    min_elem = (scalar.fmt.size if scalar else
                8 if elem is GGUFValueType.STRING else _MIN_ARRAY_HEADER_BYTES)
    if n > MAX_ARRAY_ELEMENTS or n * min_elem > MAX_ARRAY_BYTES:
        r.fail(where, f"array of {n} {elem.name} is too large; at most {MAX_ARRAY_ELEMENTS} elements "
                      f"and {MAX_ARRAY_BYTES} bytes allowed")
    if n * min_elem > r.remaining:
        r.fail(where, f"array of {n} {elem.name} needs at least {n * min_elem} bytes at offset {r.pos}, "
                      f"but the file ends after {r.remaining} (file size {r.size}; truncated?)")
    kind = (GGUFValueType.ARRAY, elem)
    if scalar is not None:
        start = r.take(n * scalar.fmt.size, where, f"array of {n} {elem.name}")
        return _LazyArray(start, n, elem), kind
    if elem is GGUFValueType.STRING:
        return _read_string_array(r, n, where), kind
    start = r.pos
    items = [_read_array(r, f"{where}[{i}]", depth + 1)[0] for i in range(n)]
    if r.pos - start > MAX_ARRAY_BYTES:
        r.fail(where, f"array is {r.pos - start} bytes; at most {MAX_ARRAY_BYTES} allowed")
    return items, kind


def _read_string_array(r: _Reader, n: int, where: str) -> list[str]:
    # The hot loop of parsing (262,144 tokens for gemma-3): local names, one bound check
    # per string, the list grows only as strings are actually found.
    buf, pos, end = r.buf, r.pos, r.size
    unpack = _U64.unpack_from
    out: list[str] = []
    append = out.append
    for i in range(n):
        if end - pos < 8:
            r.pos = pos
            r.take(8, f"{where}[{i}]", "string length")  # raises with the standard message
        (length,) = unpack(buf, pos)
        pos += 8
        if length > end - pos or length > MAX_STRING_BYTES:
            r.fail(f"{where}[{i}]", f"string length is {length} bytes at offset {pos - 8}, but "
                                    f"{min(end - pos, MAX_STRING_BYTES)} is the most allowed there "
                                    f"(file size {end}; truncated?)")
        append(buf[pos:pos + length].decode("utf-8", "surrogateescape"))
        pos += length
    if pos - r.pos > MAX_ARRAY_BYTES:
        r.fail(where, f"string array is {pos - r.pos} bytes; at most {MAX_ARRAY_BYTES} allowed")
    r.pos = pos
    return out


def _read_kvs(r: _Reader, n_kv: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    kv: dict[str, Any] = {}
    kv_types: dict[str, Any] = {}
    index: dict[str, int] = {}
    for i in range(n_kv):
        key = r.name(f"kv[{i}].key", "key")
        where = f"kv[{i}] {_show(key)}"
        if not key:
            r.fail(f"kv[{i}].key", "key is empty")
        if key in kv:
            r.fail(where, f"duplicate key; first defined at kv[{index[key]}]")
        vtype = _value_type(r, where, "value type")
        kv[key], kv_types[key] = _read_value(r, vtype, where, depth=0)
        index[key] = i
    return kv, kv_types, index


def _alignment(r: _Reader, kv: dict[str, Any], kv_types: dict[str, Any], index: dict[str, int]) -> int:
    key = "general.alignment"
    if key not in kv:
        return DEFAULT_ALIGNMENT
    where = f"kv[{index[key]}] {_show(key)}"
    if kv_types[key] is not GGUFValueType.UINT32:
        r.fail(where, f"expected type UINT32, found {_type_name(kv_types[key])}")
    value = kv[key]
    if value == 0 or value & (value - 1):
        r.fail(where, f"expected a power of two, found {value}")
    return value


def _type_name(t: Any) -> str:
    return f"ARRAY of {t[1].name}" if isinstance(t, tuple) else t.name


def _materialize(r: _Reader, value: Any) -> Any:
    """Copy lazily-recorded numeric arrays out of the map (after validation succeeded)."""
    if isinstance(value, _LazyArray):
        dtype = _SCALARS[value.vtype].dtype
        arr = np.frombuffer(r.buf, dtype=dtype, count=value.count, offset=value.offset).copy()
        return arr != 0 if value.vtype is GGUFValueType.BOOL else arr.astype(dtype.newbyteorder("="), copy=False)
    if isinstance(value, list) and value and not isinstance(value[0], str):
        return [_materialize(r, v) for v in value]
    return value


# --- tensor table -------------------------------------------------------------------------


class _RawTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    rel_offset: int
    nbytes: int


def _read_tensor_info(r: _Reader, i: int, seen: dict[str, int]) -> _RawTensor:
    # ggml keeps names in char[64]: longer names are rejected before they are read.
    name = r.name(f"tensor[{i}].name", "tensor name", limit=GGML_MAX_NAME - 1)
    where = f"tensor {_show(name)}"
    if name in seen:
        r.fail(where, f"duplicate tensor name; first defined at tensor[{seen[name]}]")

    n_dims = r.u32(where, "n_dims")
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        r.fail(where, f"n_dims must be between 1 and {GGML_MAX_DIMS}, found {n_dims}")
    shape = tuple(r.u64(where, f"ne[{j}]") for j in range(n_dims))
    for j, d in enumerate(shape):
        # ggml keeps ne as int64; a value >= 2**63 is negative there.
        if d >= INT64_LIMIT:
            r.fail(where, f"ne[{j}] must be below 2**63, found {d}")
    n_elements = 1
    for d in shape:
        n_elements *= d
    if n_elements >= INT64_LIMIT:
        r.fail(where, f"element count of shape {shape} is {n_elements}, must be below 2**63")

    raw_type = r.u32(where, "ggml type")
    qtype = _GGML_TYPES.get(raw_type)
    if qtype is None:
        r.fail(where, f"unknown ggml type {raw_type}; known: "
                      f"{', '.join(f'{int(t)} ({t.name})' for t in _GGML_TYPES.values())}")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[0] % block:
        r.fail(where, f"ne[0] = {shape[0]} is not a multiple of {qtype.name}'s block size {block}")
    nbytes = n_elements // block * type_size

    rel_offset = r.u64(where, "data offset")
    return _RawTensor(name, shape, qtype, rel_offset, nbytes)


def _read_tensor_table(r: _Reader, n_tensors: int) -> list[_RawTensor]:
    # Recheck the count against what is actually left after the metadata.
    if n_tensors * _MIN_TENSOR_INFO_BYTES > r.remaining:
        r.fail("header.n_tensors", f"{n_tensors} tensors need at least {n_tensors * _MIN_TENSOR_INFO_BYTES} "
                                   f"bytes of tensor table, but only {r.remaining} bytes follow the metadata "
                                   f"(file size {r.size}; truncated?)")
    seen: dict[str, int] = {}
    table = []
    for i in range(n_tensors):
        t = _read_tensor_info(r, i, seen)
        seen[t.name] = i
        table.append(t)
    return table


def _place_tensors(r: _Reader, table: list[_RawTensor], data_start: int, alignment: int) -> dict[str, TensorInfo]:
    """Offsets must be exactly the aligned running sum (llama.cpp requires the same): that
    makes them aligned, in table order, and free of gaps and overlaps in one check."""
    tensors: dict[str, TensorInfo] = {}
    expected = 0
    previous = None
    for t in table:
        where = f"tensor {_show(t.name)}"
        if t.rel_offset != expected:
            if t.rel_offset % alignment:
                why = f"it is not a multiple of the alignment {alignment}"
            elif t.rel_offset < expected:
                why = f"it overlaps the previous tensor {_show(previous)}" if previous else "it overlaps"
            else:
                why = "it leaves a gap after the previous tensor" if previous else "it leaves a gap"
            r.fail(where, f"data offset is {t.rel_offset}, expected {expected} (the aligned end of the "
                          f"previous tensor's data; {why})")
        start = data_start + t.rel_offset
        if start + t.nbytes > r.size:
            r.fail(where, f"data [{start}, {start + t.nbytes}) ({t.nbytes} bytes of {t.qtype.name} "
                          f"{t.shape}) extends past the end of the file at {r.size} (truncated?)")
        tensors[t.name] = TensorInfo(t.name, t.shape, t.qtype, start, t.nbytes)
        expected += _pad(t.nbytes, alignment)
        previous = t.name
    return tensors


def _fingerprint(r: _Reader, data_start: int) -> str:
    """sha256 of the file size (8 bytes, little-endian) and every byte before the data
    section: header, metadata, tensor table, padding. Ranks that compute the same
    fingerprint hold files with the same metadata, shapes, types and offsets (tensor data
    itself is not hashed: that would read the whole file)."""
    h = hashlib.sha256(_U64.pack(r.size))
    h.update(r.buf[:data_start])
    return h.hexdigest()


# --- the file -----------------------------------------------------------------------------


class GGUFFile:
    """A validated GGUF file. Construction parses and checks header, metadata and tensor
    table (raising GGUFError); tensor data is then reachable as zero-copy uint8 views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._data: np.memmap | None = None
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise GGUFError(self.path, "file", f"cannot open: {e.strerror or e}") from None
        try:
            self._size = os.fstat(self._fh.fileno()).st_size
            self._parse()
        except BaseException:
            self._fh.close()
            raise

    # -- parsing --

    def _parse(self) -> None:
        # mmap cannot map an empty file; an empty bytes object reads the same (all reads fail).
        mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if self._size else None
        try:
            r = _Reader(self.path, mm if mm is not None else b"", self._size)
            n_kv, n_tensors = self._read_header(r)
            kv, kv_types, index = _read_kvs(r, n_kv)
            self.alignment = _alignment(r, kv, kv_types, index)
            table = _read_tensor_table(r, n_tensors)
            self._data_start = _pad(r.pos, self.alignment)
            if table and self._data_start > self._size:
                r.fail("data section", f"starts at the aligned offset {self._data_start}, "
                                       f"past the end of the file at {self._size} (truncated?)")
            self.tensors = _place_tensors(r, table, self._data_start, self.alignment)
            # All checks passed: only now copy the numeric arrays out.
            self.kv = {k: _materialize(r, v) for k, v in kv.items()}
            self.kv_types = kv_types
            self._kv_index = index
            self._fingerprint = _fingerprint(r, min(self._data_start, self._size))
        finally:
            if mm is not None:
                mm.close()  # nothing may still point into it: values above are copies

    def _read_header(self, r: _Reader) -> tuple[int, int]:
        magic = r.u32("header.magic", "magic")
        if magic != GGUF_MAGIC:
            r.fail("header.magic", f"expected {_U32.pack(GGUF_MAGIC)!r}, found {_U32.pack(magic)!r}")
        version = r.u32("header.version", "version")
        if version & 0xFFFF == 0 and version:
            r.fail("header.version", f"found 0x{version:08x}, a byte-swapped version: this is a big-endian "
                                     f"GGUF file, only little-endian files are supported")
        if version not in SUPPORTED_VERSIONS:
            r.fail("header.version", f"expected version 2 or 3, found {version}")
        self.version = version
        n_tensors = r.u64("header.n_tensors", "tensor count")
        n_kv = r.u64("header.n_kv", "key/value count")
        # Lower bounds per entry: absurd counts fail here, before any loop.
        if n_kv * _MIN_KV_BYTES > r.remaining:
            r.fail("header.n_kv", f"{n_kv} key/value pairs need at least {n_kv * _MIN_KV_BYTES} bytes, "
                                  f"but only {r.remaining} bytes follow the header (file size {r.size}; truncated?)")
        if n_tensors * _MIN_TENSOR_INFO_BYTES > r.remaining - n_kv * _MIN_KV_BYTES:
            r.fail("header.n_tensors", f"{n_tensors} tensors need at least "
                                       f"{n_tensors * _MIN_TENSOR_INFO_BYTES} bytes of tensor table, but only "
                                       f"{r.remaining - n_kv * _MIN_KV_BYTES} bytes can follow "
                                       f"{n_kv} key/value pairs (file size {r.size}; truncated?)")
        return n_kv, n_tensors

    # -- metadata access --

    def get(self, key: str, default: Any = None) -> Any:
        return self.kv.get(key, default)

    def require(self, key: str, types: Any = None) -> Any:
        """The value of `key`, which must exist. `types` (optional) is one or a tuple of
        GGUFValueType (matched against the declared type; ARRAY matches any array, and a
        tuple (ARRAY, elem) an array of elem) or Python types (matched with isinstance;
        a bool does not count as an int unless bool is listed)."""
        where = f"kv[{self._kv_index[key]}] {_show(key)}" if key in self.kv else f"kv {_show(key)}"
        if key not in self.kv:
            raise GGUFError(self.path, where, "required key is missing")
        value = self.kv[key]
        if types is None:
            return value
        if not isinstance(types, tuple) or (len(types) == 2 and types[0] is GGUFValueType.ARRAY
                                            and isinstance(types[1], GGUFValueType)):
            types = (types,)
        if not any(self._matches(key, value, t) for t in types):
            wanted = ", ".join(_type_name(t) if isinstance(t, (GGUFValueType, tuple)) else t.__name__
                               for t in types)
            raise GGUFError(self.path, where, f"expected type {wanted}, found {_type_name(self.kv_types[key])}")
        return value

    def _matches(self, key: str, value: Any, t: Any) -> bool:
        declared = self.kv_types[key]
        if isinstance(t, GGUFValueType):
            return declared is t or (t is GGUFValueType.ARRAY and isinstance(declared, tuple))
        if isinstance(t, tuple):
            return declared == t
        if isinstance(value, bool) and t is not bool:
            return False
        return isinstance(value, t)

    # -- tensor data --

    @property
    def data(self) -> np.memmap:
        """Read-only uint8 map of the whole file (opened on first use, from the same open
        file that was validated)."""
        if self._data is None:
            if self._fh.closed:
                raise ValueError(f"{self.path}: GGUFFile is closed")
            size = os.fstat(self._fh.fileno()).st_size
            if size != self._size:
                raise GGUFError(self.path, "file", f"size changed from {self._size} to {size} since it was validated")
            self._data = np.memmap(self._fh, dtype=np.uint8, mode="r", shape=(self._size,))
        return self._data

    def tensor_bytes(self, name: str) -> np.ndarray:
        """uint8 view (no copy) of one tensor's data."""
        t = self.tensors[name]
        return self.data[t.offset:t.offset + t.nbytes]

    @property
    def data_offset(self) -> int:
        """Absolute offset of the (aligned) data section."""
        return self._data_start

    def fingerprint(self) -> str:
        """sha256 hex of the file size and every byte before the data section (see
        `_fingerprint`); computed while validating, so it is valid after close()."""
        return self._fingerprint

    def release_data(self) -> None:
        """Unmap the file's data (mapped again on the next tensor_bytes): once a rank has copied out
        its shard, the file's pages it touched no longer count in its resident memory."""
        self._data = None

    # -- lifetime --

    def close(self) -> None:
        # Views handed out by tensor_bytes keep their own reference to the map, so we only
        # drop ours; the OS unmaps when the last view goes.
        self._data = None
        self._fh.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, kv={len(self.kv)}, "
                f"tensors={len(self.tensors)}, alignment={self.alignment})")

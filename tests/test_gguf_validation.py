"""The validating GGUF reader (tensorsplit.model.gguf_file): valid files parse to what
gguf-py wrote/reads, and every kind of malformed or hostile file is rejected with a typed
GGUFError that names the field, fast and without large allocations."""
from __future__ import annotations

import random
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from tensorsplit.errors import GGUFError
from tensorsplit.model.gguf_file import GGUFFile, TensorInfo

MAX_SECONDS = 1.0
MAX_PEAK_BYTES = 8 << 20

# --- raw GGUF building blocks (struct only, so that any field can be corrupted) -----------


def u32(x: int) -> bytes:
    return struct.pack("<I", x)


def u64(x: int) -> bytes:
    return struct.pack("<Q", x)


def gstr(x: str | bytes) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return u64(len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def kv_u32(key: str, x: int) -> bytes:
    return kv(key, V.UINT32, u32(x))


def kv_str(key: str, x: str | bytes) -> bytes:
    return kv(key, V.STRING, gstr(x))


def kv_arr(key: str, elem: int, count: int, payload: bytes) -> bytes:
    return kv(key, V.ARRAY, u32(elem) + u64(count) + payload)


def ti(name: str | bytes, dims: list[int], qtype: int, offset: int) -> bytes:
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(qtype) + u64(offset)


def build(kvs: list[bytes], tis: list[bytes], data: bytes = b"", *, magic: bytes = b"GGUF",
          version: bytes = u32(3), n_kv: int | None = None, n_tensors: int | None = None,
          align: int = 32) -> bytes:
    head = magic + version + u64(len(tis) if n_tensors is None else n_tensors) \
        + u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tis)
    pad = -len(head) % align
    return head + b"\0" * pad + data


def good_kvs() -> list[bytes]:
    return [
        kv_str("general.architecture", "llama"),
        kv_str("general.name", "tiny"),
        kv_u32("llama.block_count", 2),
        kv_arr("tokenizer.ggml.tokens", V.STRING, 3, gstr("a") + gstr("bc") + gstr("<s>")),
        kv_arr("tokenizer.ggml.scores", V.FLOAT32, 3, struct.pack("<3f", 0.0, -1.0, 2.5)),
    ]


# f32 (8,) = 32 bytes at 0; Q8_0 (32, 2) = 2 * 34 = 68 bytes at 32 (padded to 96); f32 (4, 2) at 128.
GOOD_TIS = [(b"a.weight", [8], Q.F32, 0), (b"b.weight", [32, 2], Q.Q8_0, 32), (b"c.weight", [4, 2], Q.F32, 128)]
GOOD_DATA = bytes((i * 7) % 251 for i in range(160))  # 160 = 128 + 32


def good_file(kvs: list[bytes] | None = None, tis: list[tuple] | None = None, data: bytes | None = None,
              **kw) -> bytes:
    return build(good_kvs() if kvs is None else kvs,
                 [ti(*t) for t in (GOOD_TIS if tis is None else tis)],
                 GOOD_DATA if data is None else data, **kw)


def write(tmp_path: Path, blob: bytes, name: str = "t.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(blob)
    return p


def expect_error(path: Path, where: str, *message_parts: str, check_memory: bool = False) -> GGUFError:
    """Parse `path`; it must fail with a GGUFError whose `where` contains `where` and whose
    message contains every part, within MAX_SECONDS (and MAX_PEAK_BYTES if asked)."""
    t0 = time.perf_counter()
    with pytest.raises(GGUFError) as info:
        GGUFFile(path)
    elapsed = time.perf_counter() - t0
    err = info.value
    assert elapsed < MAX_SECONDS, f"took {elapsed:.3f} s to reject: {err}"
    assert where in err.where, f"where={err.where!r}, expected it to name {where!r}: {err}"
    for part in message_parts:
        assert part in str(err), f"{part!r} not in {str(err)!r}"
    assert str(path) in str(err)
    if check_memory:
        tracemalloc.start()
        try:
            with pytest.raises(GGUFError):
                GGUFFile(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < MAX_PEAK_BYTES, f"peak allocation {peak} bytes while rejecting: {err}"
    return err


# --- valid files -------------------------------------------------------------------------


def test_hand_built_good_file_parses(tmp_path):
    p = write(tmp_path, good_file())
    with GGUFFile(p) as f:
        assert f.version == 3 and f.alignment == 32
        assert f.kv["general.architecture"] == "llama"
        assert f.kv["tokenizer.ggml.tokens"] == ["a", "bc", "<s>"]
        np.testing.assert_array_equal(f.kv["tokenizer.ggml.scores"], np.array([0.0, -1.0, 2.5], np.float32))
        assert f.kv_types["tokenizer.ggml.tokens"] == (V.ARRAY, V.STRING)
        assert list(f.tensors) == ["a.weight", "b.weight", "c.weight"]
        b = f.tensors["b.weight"]
        assert b.shape == (32, 2) and b.qtype is Q.Q8_0 and b.nbytes == 68 and b.n_elements == 64
        assert b.offset == f.data_offset + 32
        assert f.tensor_bytes("c.weight").tobytes() == GOOD_DATA[128:160]


def _writer_file(path: Path, alignment: int | None = None) -> dict:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name("tiny")
    w.add_uint32("llama.block_count", 2)
    w.add_int32("test.neg", -5)
    w.add_float32("test.eps", 1e-5)
    w.add_float64("test.f64", 0.125)
    w.add_uint64("test.big", 1 << 40)
    w.add_bool("test.flag", True)
    w.add_array("tokenizer.ggml.tokens", ["<unk>", "hello", "wörld", "🙂"])
    w.add_array("tokenizer.ggml.token_type", [1, 2, 3, 3])
    w.add_array("test.floats", [0.5, 1.5])
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 8)).astype(np.float32)          # ggml shape (8, 3)
    q_src = rng.standard_normal((2, 64)).astype(np.float32)        # ggml shape (64, 2)
    q8 = gguf.quants.quantize(q_src, Q.Q8_0)                       # (2, 68) uint8
    w.add_tensor("norm.weight", rng.standard_normal(5).astype(np.float32))
    w.add_tensor("f32.weight", f32)
    w.add_tensor("q8.weight", q8, raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"f32": f32, "q8": q8}


def test_gguf_writer_file_matches_what_was_written(tmp_path):
    p = tmp_path / "w.gguf"
    written = _writer_file(p)
    with GGUFFile(p) as f:
        assert f.kv["general.architecture"] == "llama" and f.kv["general.name"] == "tiny"
        assert f.kv["llama.block_count"] == 2 and f.kv_types["llama.block_count"] is V.UINT32
        assert f.kv["test.neg"] == -5 and f.kv_types["test.neg"] is V.INT32
        assert f.kv["test.eps"] == pytest.approx(1e-5) and f.kv_types["test.eps"] is V.FLOAT32
        assert f.kv["test.f64"] == 0.125 and f.kv["test.big"] == 1 << 40
        assert f.kv["test.flag"] is True
        assert f.kv["tokenizer.ggml.tokens"] == ["<unk>", "hello", "wörld", "🙂"]
        tt = f.kv["tokenizer.ggml.token_type"]
        assert isinstance(tt, np.ndarray) and tt.dtype == np.int32 and tt.tolist() == [1, 2, 3, 3]
        assert f.kv["test.floats"].dtype == np.float32 and f.kv["test.floats"].tolist() == [0.5, 1.5]
        assert f.tensors["norm.weight"] == TensorInfo("norm.weight", (5,), Q.F32, f.tensors["norm.weight"].offset, 20)
        assert f.tensors["f32.weight"].shape == (8, 3) and f.tensors["f32.weight"].qtype is Q.F32
        q = f.tensors["q8.weight"]
        assert q.shape == (64, 2) and q.qtype is Q.Q8_0 and q.nbytes == 2 * 2 * 34
        assert f.tensor_bytes("f32.weight").view(np.float32).reshape(3, 8).tolist() == written["f32"].tolist()
        assert f.tensor_bytes("q8.weight").tobytes() == written["q8"].tobytes()
        # and byte-for-byte what gguf-py's own reader sees
        reader = gguf.GGUFReader(p)
        for rt in reader.tensors:
            assert f.tensor_bytes(rt.name).tobytes() == rt.data.tobytes()
            assert f.tensors[rt.name].offset == rt.data_offset
        # tensor_bytes is a view of the map, not a copy
        assert not f.tensor_bytes("q8.weight").flags.owndata


def test_custom_alignment(tmp_path):
    p = tmp_path / "a.gguf"
    _writer_file(p, alignment=64)
    with GGUFFile(p) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0
        assert all((t.offset - f.data_offset) % 64 == 0 for t in f.tensors.values())


def _assert_matches_gguf_reader(f: GGUFFile, reader: gguf.GGUFReader) -> None:
    fields = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(f.kv)
    for key, field in fields.items():
        main = V(field.types[0])
        want_type = (V.ARRAY, V(field.types[-1])) if main is V.ARRAY else main
        assert f.kv_types[key] == want_type, key
        ours, theirs = f.kv[key], field.contents()
        if isinstance(ours, np.ndarray):
            assert np.array_equal(ours, np.array(theirs, dtype=ours.dtype)), key
        else:
            assert ours == theirs, key
    assert list(f.tensors) == [t.name for t in reader.tensors]
    for rt in reader.tensors:
        t = f.tensors[rt.name]
        assert t.shape == tuple(int(d) for d in rt.shape)
        assert t.qtype == rt.tensor_type and t.offset == rt.data_offset and t.nbytes == rt.n_bytes
        assert t.n_elements == rt.n_elements
        assert np.array_equal(f.tensor_bytes(rt.name), rt.data.reshape(-1).view(np.uint8))
    assert f.alignment == reader.alignment and f.data_offset == reader.data_offset


def test_real_smollm2_matches_gguf_reader(smollm2_path):
    t0 = time.perf_counter()
    f = GGUFFile(smollm2_path)
    assert time.perf_counter() - t0 < MAX_SECONDS
    with f:
        _assert_matches_gguf_reader(f, gguf.GGUFReader(smollm2_path))
        assert len(f.kv["tokenizer.ggml.tokens"]) == 49152
        assert len(f.fingerprint()) == 64


def test_no_tensors_and_zero_size_tensor(tmp_path):
    with GGUFFile(write(tmp_path, build(good_kvs(), []), "empty.gguf")) as f:
        assert f.tensors == {} and f.kv["general.name"] == "tiny"
    # llama.cpp accepts zero-element tensors (ne >= 0); they take no bytes.
    blob = good_file(tis=[(b"z", [8, 0], Q.F32, 0), (b"a", [8], Q.F32, 0)], data=b"\1" * 32)
    with GGUFFile(write(tmp_path, blob)) as f:
        assert f.tensors["z"].nbytes == 0 and f.tensors["z"].n_elements == 0
        assert f.tensor_bytes("a").tobytes() == b"\1" * 32


def test_version_2_parses(tmp_path):
    with GGUFFile(write(tmp_path, good_file(version=u32(2)))) as f:
        assert f.version == 2


def test_nested_arrays_parse_to_lists(tmp_path):
    inner = u32(V.UINT16) + u64(2) + struct.pack("<2H", 7, 9)
    inner_s = u32(V.STRING) + u64(1) + gstr("x")
    blob = good_file(kvs=good_kvs() + [kv_arr("test.nested", V.ARRAY, 2, inner + inner_s)])
    with GGUFFile(write(tmp_path, blob)) as f:
        value = f.kv["test.nested"]
        assert isinstance(value, list) and value[0].tolist() == [7, 9] and value[0].dtype == np.uint16
        assert value[1] == ["x"]
        assert f.kv_types["test.nested"] == (V.ARRAY, V.ARRAY)


def test_non_utf8_string_value_is_kept_losslessly(tmp_path):
    blob = good_file(kvs=good_kvs() + [kv_str("test.raw", b"\xff\xfeok")])
    with GGUFFile(write(tmp_path, blob)) as f:
        assert f.kv["test.raw"].encode("utf-8", "surrogateescape") == b"\xff\xfeok"


def test_require_and_get(tmp_path):
    with GGUFFile(write(tmp_path, good_file())) as f:
        assert f.get("nope") is None and f.get("nope", 3) == 3
        assert f.require("llama.block_count") == 2
        assert f.require("llama.block_count", V.UINT32) == 2
        assert f.require("llama.block_count", (V.UINT32, V.INT32)) == 2
        assert f.require("llama.block_count", int) == 2
        assert f.require("tokenizer.ggml.tokens", (V.ARRAY, V.STRING)) == ["a", "bc", "<s>"]
        assert f.require("tokenizer.ggml.tokens", V.ARRAY) == ["a", "bc", "<s>"]
        with pytest.raises(GGUFError, match="llama.context_length.*missing"):
            f.require("llama.context_length")
        with pytest.raises(GGUFError, match="llama.block_count.*expected type STRING, found UINT32"):
            f.require("llama.block_count", V.STRING)
        with pytest.raises(GGUFError, match="tokenizer.ggml.tokens.*ARRAY of FLOAT32"):
            f.require("tokenizer.ggml.tokens", (V.ARRAY, V.FLOAT32))
        with pytest.raises(GGUFError, match="general.name"):
            f.require("general.name", (int, float))


def test_fingerprint(tmp_path):
    a = write(tmp_path, good_file(), "a.gguf")
    b = tmp_path / "b.gguf"
    shutil.copy(a, b)
    other_data = write(tmp_path, good_file(data=b"\0" * len(GOOD_DATA)), "c.gguf")
    other_meta = write(tmp_path, good_file(kvs=good_kvs()[:-1]), "d.gguf")
    longer = write(tmp_path, good_file() + b"\0" * 32, "e.gguf")
    fps = {}
    for p in (a, b, other_data, other_meta, longer):
        with GGUFFile(p) as f:
            fps[p.name] = f.fingerprint()
    assert fps["a.gguf"] == fps["b.gguf"]
    assert fps["a.gguf"] == fps["c.gguf"]  # covers metadata and size, not tensor data
    assert fps["a.gguf"] != fps["d.gguf"]
    assert fps["a.gguf"] != fps["e.gguf"]


def test_close(tmp_path):
    f = GGUFFile(write(tmp_path, good_file()))
    view = f.tensor_bytes("a.weight")
    f.close()
    assert view.tobytes() == GOOD_DATA[:32]  # views outlive close
    f.close()  # idempotent


# --- one test per validation rule ---------------------------------------------------------


def test_bad_magic(tmp_path):
    expect_error(write(tmp_path, good_file(magic=b"GGUX")), "header.magic", "expected b'GGUF'", "GGUX")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFF])
def test_bad_version(tmp_path, version):
    expect_error(write(tmp_path, good_file(version=u32(version))), "header.version", "2 or 3", f"found {version}")


def test_big_endian_is_named(tmp_path):
    expect_error(write(tmp_path, good_file(version=struct.pack(">I", 3))), "header.version", "big-endian")


def test_huge_kv_count(tmp_path):
    expect_error(write(tmp_path, good_file(n_kv=1 << 60)), "header.n_kv", str(1 << 60), check_memory=True)


def test_huge_tensor_count(tmp_path):
    expect_error(write(tmp_path, good_file(n_tensors=1 << 60)), "header.n_tensors", str(1 << 60),
                 check_memory=True)


def test_tensor_count_past_metadata(tmp_path):
    # passes the header's coarse bound (kv lower bound is small) but not the recheck after metadata
    blob = good_file(n_tensors=3 + 10)
    expect_error(write(tmp_path, blob), "", "truncated", check_memory=True)


def test_string_length_past_eof(tmp_path):
    blob = build([kv_str("general.architecture", "llama"), kv("general.name", V.STRING, u64(1000) + b"tiny")], [])
    expect_error(write(tmp_path, blob), "kv[1] 'general.name'", "1000", "truncated", check_memory=True)


def test_key_length_past_eof(tmp_path):
    blob = build([kv_str("general.architecture", "llama"), u64(5000) + b"general.name"], [])
    expect_error(write(tmp_path, blob), "kv[1].key", "5000", "truncated", check_memory=True)


def test_string_longer_than_1gib(tmp_path):
    blob = build([kv("general.name", V.STRING, u64((1 << 30) + 1) + b"x" * 64)], [])
    expect_error(write(tmp_path, blob), "kv[0] 'general.name'", str((1 << 30) + 1), "at most",
                 check_memory=True)


def test_array_count_2_to_40(tmp_path):
    blob = build([kv_arr("test.bytes", V.UINT8, 1 << 40, b"\0" * 64)], [])
    expect_error(write(tmp_path, blob), "kv[0] 'test.bytes'", str(1 << 40), "too large", check_memory=True)


@pytest.mark.parametrize("elem", [V.UINT8, V.UINT64, V.STRING, V.ARRAY])
def test_array_count_past_eof(tmp_path, elem):
    # under the 1 GiB cap, but more elements than the file could hold
    blob = build([kv_arr("test.arr", elem, 1 << 26, b"\0" * 64)], [])
    expect_error(write(tmp_path, blob), "kv[0] 'test.arr'", str(1 << 26), "truncated", check_memory=True)


def test_string_array_element_past_eof(tmp_path):
    blob = build([kv_arr("tokenizer.ggml.tokens", V.STRING, 3, gstr("a") + u64(999) + b"b" * 16 + gstr("c"))], [])
    expect_error(write(tmp_path, blob), "kv[0] 'tokenizer.ggml.tokens'[1]", "999", check_memory=True)


def test_nested_arrays_too_deep(tmp_path):
    payload = b""
    for _ in range(6):
        payload += u32(V.ARRAY) + u64(1)
    payload += u32(V.UINT8) + u64(1) + b"\1"
    blob = build([kv("test.deep", V.ARRAY, payload)], [])
    expect_error(write(tmp_path, blob), "kv[0] 'test.deep'", "nested", check_memory=True)


def test_unknown_value_type(tmp_path):
    expect_error(write(tmp_path, good_file(kvs=good_kvs() + [kv("test.x", 13, u32(0))])),
                 "kv[5] 'test.x'", "unknown value type 13")


def test_unknown_array_element_type(tmp_path):
    expect_error(write(tmp_path, good_file(kvs=good_kvs() + [kv_arr("test.x", 77, 1, b"\0" * 8)])),
                 "kv[5] 'test.x'", "unknown array element type 77")


def test_duplicate_key(tmp_path):
    expect_error(write(tmp_path, good_file(kvs=good_kvs() + [kv_u32("llama.block_count", 3)])),
                 "kv[5] 'llama.block_count'", "duplicate key", "kv[2]")


def test_empty_key(tmp_path):
    expect_error(write(tmp_path, good_file(kvs=[kv_u32("", 3)] + good_kvs())), "kv[0].key", "empty")


def test_non_utf8_key(tmp_path):
    expect_error(write(tmp_path, good_file(kvs=good_kvs() + [kv_u32(b"bad\xff\xfekey", 1)])),
                 "kv[5].key", "not valid UTF-8")


def test_duplicate_tensor_name(tmp_path):
    tis = GOOD_TIS[:2] + [(b"a.weight", [4, 2], Q.F32, 128)]
    expect_error(write(tmp_path, good_file(tis=tis)), "tensor 'a.weight'", "duplicate tensor name", "tensor[0]")


def test_non_utf8_tensor_name(tmp_path):
    tis = GOOD_TIS[:2] + [(b"c\xc3(", [4, 2], Q.F32, 128)]
    expect_error(write(tmp_path, good_file(tis=tis)), "tensor[2].name", "not valid UTF-8")


def test_tensor_name_with_nul(tmp_path):
    tis = GOOD_TIS[:2] + [(b"c\0x", [4, 2], Q.F32, 128)]
    expect_error(write(tmp_path, good_file(tis=tis)), "tensor[2].name", "NUL")


def test_tensor_name_too_long(tmp_path):
    tis = GOOD_TIS[:2] + [(b"n" * 64, [4, 2], Q.F32, 128)]
    expect_error(write(tmp_path, good_file(tis=tis)), "tensor[2].name", "64", "at most 63")


@pytest.mark.parametrize("alignment", [0, 3, 48, 0x80000001])
def test_alignment_not_power_of_two(tmp_path, alignment):
    blob = good_file(kvs=good_kvs() + [kv_u32("general.alignment", alignment)])
    expect_error(write(tmp_path, blob), "kv[5] 'general.alignment'", "power of two", f"found {alignment}")


def test_alignment_wrong_type(tmp_path):
    blob = good_file(kvs=good_kvs() + [kv("general.alignment", V.UINT64, u64(32))])
    expect_error(write(tmp_path, blob), "kv[5] 'general.alignment'", "UINT32", "UINT64")


@pytest.mark.parametrize("dims", [[1, 1, 1, 1, 8], []], ids=["n_dims5", "n_dims0"])
def test_bad_n_dims(tmp_path, dims):
    tis = GOOD_TIS[:2] + [(b"c.weight", dims, Q.F32, 128)]
    expect_error(write(tmp_path, good_file(tis=tis)), "tensor 'c.weight'", "n_dims", f"found {len(dims)}")


@pytest.mark.parametrize("dims", [[1 << 32, 1 << 32], [1 << 21, 1 << 21, 1 << 21], [1 << 63]],
                         ids=["2d", "3d", "dim"])
def test_element_count_overflow(tmp_path, dims):
    tis = GOOD_TIS[:2] + [(b"c.weight", dims, Q.F32, 128)]
    expect_error(write(tmp_path, good_file(tis=tis)), "tensor 'c.weight'", "2**63", check_memory=True)


def test_huge_tensor_data_past_eof(tmp_path):
    # representable, but 2**62 bytes: the data check must catch it without touching it
    tis = GOOD_TIS[:2] + [(b"c.weight", [1 << 30, 1 << 30], Q.F32, 128)]
    expect_error(write(tmp_path, good_file(tis=tis)), "tensor 'c.weight'", "past the end", check_memory=True)


@pytest.mark.parametrize("qtype", [4, 5, 31, 999, 1 << 31])
def test_unknown_ggml_type(tmp_path, qtype):
    tis = GOOD_TIS[:2] + [(b"c.weight", [4, 2], qtype, 128)]
    expect_error(write(tmp_path, good_file(tis=tis)), "tensor 'c.weight'", f"unknown ggml type {qtype}")


def test_ne0_not_multiple_of_block(tmp_path):
    tis = GOOD_TIS[:2] + [(b"c.weight", [33, 1], Q.Q4_0, 128)]
    expect_error(write(tmp_path, good_file(tis=tis)), "tensor 'c.weight'", "ne[0] = 33", "Q4_0", "block size 32")


def test_misaligned_offset(tmp_path):
    tis = [GOOD_TIS[0], (b"b.weight", [32, 2], Q.Q8_0, 40), GOOD_TIS[2]]
    expect_error(write(tmp_path, good_file(tis=tis)), "tensor 'b.weight'", "offset is 40, expected 32",
                 "alignment")


def test_overlapping_tensors(tmp_path):
    tis = [GOOD_TIS[0], (b"b.weight", [32, 2], Q.Q8_0, 0), GOOD_TIS[2]]
    expect_error(write(tmp_path, good_file(tis=tis)), "tensor 'b.weight'", "offset is 0, expected 32", "overlaps")


def test_out_of_order_tensors(tmp_path):
    tis = [GOOD_TIS[0], (b"b.weight", [32, 2], Q.Q8_0, 128), (b"c.weight", [4, 2], Q.F32, 32)]
    expect_error(write(tmp_path, good_file(tis=tis)), "tensor 'b.weight'", "offset is 128, expected 32", "gap")


def test_tensor_data_past_eof(tmp_path):
    expect_error(write(tmp_path, good_file(data=GOOD_DATA[:150])), "tensor 'c.weight'", "past the end", "truncated")


def test_data_section_past_eof(tmp_path):
    blob = good_file()
    cut = len(blob) - len(GOOD_DATA) - 1  # inside the padding before the data section
    head = blob[:cut]
    assert len(head) % 32 != 0
    expect_error(write(tmp_path, head), "", "truncated")


def _cut_points() -> list[int]:
    blob = good_file()
    n = len(blob)
    kv_end = len(build(good_kvs(), [], align=1))
    return sorted({0, 1, 3, 4, 6, 8, 15, 16, 23, 24, 30, 40, kv_end - 20, kv_end - 1, kv_end + 5,
                   n - len(GOOD_DATA) - 40, n - len(GOOD_DATA), n - 1})


@pytest.mark.parametrize("cut", _cut_points())
def test_truncated_file(tmp_path, cut):
    blob = good_file()
    expect_error(write(tmp_path, blob[:cut]), "", "truncated", check_memory=True)


def test_not_a_file(tmp_path):
    expect_error(tmp_path / "missing.gguf", "file", "cannot open")


# --- fuzz -----------------------------------------------------------------------------------


def test_fuzz_never_escapes_gguf_error(tmp_path):
    src = tmp_path / "w.gguf"
    _writer_file(src)
    good = src.read_bytes()
    with GGUFFile(src) as f:
        meta_end = f.data_offset
    rng = random.Random(20240611)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "GGUFError": 0}
    for i in range(200):
        blob = bytearray(good)
        kind = rng.choice(["flip", "flip", "big", "truncate", "flip+truncate"])
        if "flip" in kind:
            for _ in range(rng.randint(1, 4)):
                blob[rng.randrange(meta_end)] = rng.randrange(256)
        if kind == "big":  # an 8-byte field overwritten with a huge or odd value
            pos = rng.randrange(meta_end - 8)
            blob[pos:pos + 8] = u64(rng.choice([1 << 63, (1 << 64) - 1, 1 << 40, 1 << 30, 0, 7]))
        if "truncate" in kind:
            blob = blob[:rng.randrange(len(blob))]
        path.write_bytes(bytes(blob))
        t0 = time.perf_counter()
        try:
            with GGUFFile(path) as f:
                for name in f.tensors:
                    assert f.tensor_bytes(name).size == f.tensors[name].nbytes
                f.fingerprint()
            outcomes["ok"] += 1
        except GGUFError:
            outcomes["GGUFError"] += 1
        elapsed = time.perf_counter() - t0
        assert elapsed < MAX_SECONDS, f"variant {i} ({kind}) took {elapsed:.3f} s"
    assert outcomes["GGUFError"] > 50, outcomes


def test_real_gemma3_parses_fast(gemma3_path):
    t0 = time.perf_counter()
    with GGUFFile(gemma3_path) as f:
        elapsed = time.perf_counter() - t0
        assert len(f.kv["tokenizer.ggml.tokens"]) == 262144
        assert f.kv["tokenizer.ggml.scores"].shape == (262144,)
        assert f.tensors["token_embd.weight"].shape == (640, 262144)
    assert elapsed < MAX_SECONDS

"""KV cache types (-ctk/-ctv: kernels/kv_types.py, csrc/kv_cache.h) against a NumPy transcription of
llama.cpp's block quantization and a float64 attention.

- Stored bytes: the torch codec and the native attention op both write what ggml's x86
  quantize_row_q8_0 and quantize_row_q4_0_ref write (f16 / bf16 rounded to nearest even), on rows with
  zeros, exact ties and equal maxima of both signs; gguf-py's dequantization reads them back.
- Where llama.cpp rotates a quantized cache (Walsh-Hadamard, head dims that are multiples of 64) and
  the rotation itself, against its matrix.
- Attention reads them in place: a prompt, then decode steps from 250 to 262 positions (across the
  decode attention's chunk of 256 and a ring window of 100), global and sliding layers, each type for
  k and v; against float64 attention over the values the cache gives back (exact numerics: no f16
  rounding of q or of the probabilities), on the native op and the torch path; the native op bit for
  bit the same at 1 and 2 threads.
- The memory plan counts the type (`info`), and a world of 2 ranks gives the logits of 1 with a
  quantized cache; `generate -ctk q8_0 -ctv q4_0` runs across 2 workers.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from cli_helpers import run_cli
from synthetic import write_model
from tensorsplit import kernels
from tensorsplit.comm.local import ThreadWorld
from tensorsplit.kernels.choice import choose_kernels
from tensorsplit.kernels.kv_types import KV_TYPES, decode, encode, k_rotation, rotate, v_rotation
from tensorsplit.kernels.numerics import EXACT, LLAMACPP
from tensorsplit.model import make_plan, open_model
from tensorsplit.model.attention import Attention, KVCache
from tensorsplit.model.layers import no_reduce
from tensorsplit.model.transformer import RankModel

TYPES = list(KV_TYPES)
F32 = np.float32


def np_encode(x: np.ndarray, name: str) -> np.ndarray:
    """(n, hd) float32 -> (n, row bytes) uint8, as llama.cpp's CPU backend stores a KV cache row."""
    n, hd = x.shape
    if name == "f32":
        return x.astype(F32).view(np.uint8)
    if name == "f16":
        return x.astype(np.float16).view(np.uint8)
    if name == "bf16":
        u = x.astype(F32).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).view(np.uint8)
    b = x.astype(F32).reshape(-1, 32)
    if name == "q8_0":                           # ggml-cpu arch/x86 quantize_row_q8_0
        amax = np.abs(b).max(1)
        d = (amax / F32(127)).astype(np.float16)
        inv = np.where(amax != 0, F32(127) / np.where(amax != 0, amax, F32(1)), F32(0)).astype(F32)
        q = np.rint(b * inv[:, None]).astype(np.int8)                 # rint: ties to even, as vroundps
        blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), q.view(np.uint8)], 1)
    else:                                        # quantize_row_q4_0_ref
        j = np.abs(b).argmax(1)                  # the first of equal magnitudes
        m = b[np.arange(len(b)), j]
        d = (m / F32(-8)).astype(F32)
        inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
        xi = np.minimum(15, np.trunc(b * inv[:, None] + F32(8.5)).astype(np.int8)).astype(np.uint8)
        blocks = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), xi[:, :16] | (xi[:, 16:] << 4)], 1)
    return blocks.reshape(n, -1)


def np_decode(s: np.ndarray, name: str, hd: int) -> np.ndarray:
    """Stored rows -> float64 values, by gguf-py's dequantization for the block types."""
    if name in ("f32", "f16"):
        return s.view(F32 if name == "f32" else np.float16).astype(np.float64)
    if name == "bf16":
        return (s.view(np.uint16).astype(np.uint32) << 16).view(F32).astype(np.float64)
    qt = Q.Q8_0 if name == "q8_0" else Q.Q4_0
    return dequantize(s.reshape(-1, s.shape[-1] // (hd // 32)), qt).reshape(s.shape[0], hd).astype(np.float64)


def awkward_rows(hd: int, rng) -> np.ndarray:
    """Random rows, and rows that test the rounding: zeros, values on exact halves of a q8_0 step,
    a block whose largest magnitudes are equal with opposite signs (q4_0 takes the first)."""
    x = (rng.standard_normal((6, hd)) * 2).astype(F32)
    x[1] = 0.0
    x[2, :32] = np.arange(32, dtype=F32) - 15.5                          # q8_0 ties: amax 127, so x * 127 / amax
    x[2, 0] = 127.0                                                      # is x, on halves
    x[2, 32:64] = np.arange(32, dtype=F32) * 0.25 - 4.0
    x[3, :32] = np.linspace(-1, 1, 32, dtype=F32)
    x[3, 0], x[3, 5] = -3.0, 3.0
    x[4, 32:] = 0.0
    x[5] = (np.arange(hd, dtype=F32) % 16 - 8) / 8                       # exact q4_0 ties
    return x


@pytest.mark.parametrize("name", TYPES)
def test_stored_bytes_are_llamacpps(name):
    """head_dim 96: no rotation (not a multiple of 64), so the op's stored bytes are the rows' own."""
    hd, KV = 96, 2
    rng = np.random.default_rng(3)
    x = awkward_rows(hd, rng)
    want = np_encode(x, name)
    t = KV_TYPES[name]
    got = encode(torch.from_numpy(x), t)
    assert torch.equal(got.view(torch.uint8), torch.from_numpy(want)), name
    back = decode(got, t, hd, torch.float64).numpy()
    assert np.array_equal(back, np_decode(want, name, hd))
    if not kernels.native():
        pytest.fail("the native kernels did not build")
    # the native op writes the step's keys and values into the cache (a global layer: before attending)
    n = x.shape[0] // KV
    k = torch.from_numpy(x.reshape(n, KV, hd))
    cache = KVCache(1, 1, 8, KV, hd, "cpu", t)
    attn = Attention((0, 2), (0, KV), 1, hd, choose_kernels("cpu", LLAMACPP))
    attn(torch.zeros(n, 2, hd), k, k.clone(), cache, 0, torch.arange(n), torch.zeros(n, dtype=torch.long))
    stored = cache.k[0, 0, :n].reshape(n * KV, -1).view(torch.uint8)
    assert torch.equal(stored, torch.from_numpy(want)), name
    assert torch.equal(cache.v[0, 0, :n].reshape(n * KV, -1).view(torch.uint8), torch.from_numpy(want))


def hadamard64(n: int) -> np.ndarray:
    """llama.cpp's ggml_gen_hadamard, in float64: Sylvester's order, entries +-1/sqrt(n)."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def test_the_rotation_is_llamacpps():
    """Where llama.cpp rotates a quantized cache (head dims that are multiples of 64; keys by the largest
    power of two dividing the head dim, values by 64) and the rotation itself: each chunk times its
    Walsh-Hadamard matrix, which is its own inverse."""
    assert [k_rotation(KV_TYPES["q8_0"], hd) for hd in (64, 128, 192, 256, 96, 80)] == [64, 128, 64, 256, 0, 0]
    assert [v_rotation(KV_TYPES["q4_0"], hd) for hd in (64, 128, 256, 96)] == [64, 64, 64, 0]
    assert k_rotation(KV_TYPES["f16"], 128) == v_rotation(KV_TYPES["bf16"], 128) == 0
    x = np.random.default_rng(1).standard_normal((5, 256)).astype(F32)
    for n in (64, 128, 256):
        want = (x.astype(np.float64).reshape(5, -1, n) @ hadamard64(n)).reshape(5, 256)
        got = rotate(torch.from_numpy(x), n)
        assert np.abs(got.numpy() - want).max() < 1e-5 * np.abs(want).max()
        assert np.abs(rotate(got, n).numpy() - x).max() < 1e-5


def np_rotate(x: np.ndarray, n: int) -> np.ndarray:
    """The float32 butterflies of kv_types.rotate, in NumPy."""
    if not n:
        return x
    y = x.astype(F32).reshape(-1, n).copy()
    h = 1
    while h < n:
        for i in range(0, n, 2 * h):
            a, b = y[:, i:i + h].copy(), y[:, i + h:i + 2 * h].copy()
            y[:, i:i + h], y[:, i + h:i + 2 * h] = a + b, a - b
        h *= 2
    return (y * (F32(1) / np.sqrt(F32(n)))).reshape(x.shape)


def _attention64(q, k, v, scale, window):
    """float64 causal attention, each token over positions [p - window + 1, p] (all of [0, p] if 0);
    q (n, H, hd), k and v (n, KV, hd) already as the cache gives them back."""
    n, H, hd = q.shape
    group = H // k.shape[1]
    out = np.zeros((n, H, hd))
    for p in range(n):
        lo = max(0, p - window + 1) if window else 0
        for h in range(H):
            s = k[lo:p + 1, h // group] @ q[p, h] * scale
            e = np.exp(s - s.max())
            out[p, h] = (e / e.sum()) @ v[lo:p + 1, h // group]
    return out


def _attention_runs(q, k, v, KV, kt, vt, numerics, scale, n_prompt, window=0, prompt_rows=0):
    """The Attention op over q, k, v (n, heads, hd) float32: a prompt of n_prompt tokens, then one decode step
    per token; its outputs (the prompt's last prompt_rows, then the steps') as float64 (rows, H, hd), for the
    torch path at 2 threads and the native op at 1 and 2, keyed (native, threads)."""
    n, H, hd = q.shape
    runs = {}
    threads = torch.get_num_threads()
    try:
        for native, t in ((False, 2), (True, 1), (True, 2)):
            if native and not kernels.native():
                pytest.fail("the native kernels did not build")
            torch.set_num_threads(t)
            attn = Attention((0, H), (0, KV), H // KV, hd, choose_kernels("cpu", numerics, native), scale=scale)
            cache = KVCache(1, 1, 512, KV, hd, "cpu", KV_TYPES[kt], windows=(window,), v_type=KV_TYPES[vt])
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            prompt = attn(tq[:n_prompt], tk[:n_prompt], tv[:n_prompt], cache, 0, torch.arange(n_prompt),
                          torch.zeros(n_prompt, dtype=torch.long))
            steps = [attn(tq[p:p + 1], tk[p:p + 1], tv[p:p + 1], cache, 0, torch.tensor([p]),
                          torch.zeros(1, dtype=torch.long)) for p in range(n_prompt, n)]
            rows = [prompt[prompt.shape[0] - prompt_rows:]] if prompt_rows else []
            runs[native, t] = torch.cat(rows + steps).double().numpy().reshape(-1, H, hd)
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("window", [0, 100], ids=["global", "ring"])
@pytest.mark.parametrize("kt,vt", [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("bf16", "bf16"), ("q8_0", "f16"),
                                   ("f16", "q4_0")])
def test_attention_reads_each_type_in_place(kt, vt, window):
    hd, H, KV, n_prompt, n = 64, 4, 2, 250, 262
    rng = np.random.default_rng(7)
    q = rng.standard_normal((n, H, hd)).astype(F32)
    k = rng.standard_normal((n, KV, hd)).astype(F32)
    v = rng.standard_normal((n, KV, hd)).astype(F32)
    # a quantized cache holds rotated rows (llama.cpp's attn_rot): q and k by kr, v by vr, the output back
    kr, vr = k_rotation(KV_TYPES[kt], hd), v_rotation(KV_TYPES[vt], hd)
    k64 = np_decode(np_encode(np_rotate(k, kr).reshape(-1, hd), kt), kt, hd).reshape(k.shape)
    v64 = np_decode(np_encode(np_rotate(v, vr).reshape(-1, hd), vt), vt, hd).reshape(v.shape)
    scale = 1 / np.sqrt(hd)
    ref = _attention64(np_rotate(q, kr).astype(np.float64), k64, v64, scale, window)[n_prompt:]
    if vr:
        ref = (ref.reshape(-1, hd // vr, vr) @ hadamard64(vr)).reshape(ref.shape)
    runs = _attention_runs(q, k, v, KV, kt, vt, EXACT, scale, n_prompt, window=window)
    assert np.array_equal(runs[True, 1], runs[True, 2])
    for key, got in runs.items():
        err = np.abs(got - ref).max()
        assert err < 2e-5, (kt, vt, window, key, err)


def _attention64_llamacpp(q, k, v, scale, q_stored):
    """float64 causal decode attention under llama.cpp's roundings: q as q_stored gives it back (f16, or the
    q8_0 that flash attention quantizes q to for q8_0 / q4_0 keys), the scores scaled, the probabilities
    rounded to f16. q (n, H, hd) float32; k, v (n, KV, hd) as the cache gives them back."""
    n, H, hd = q.shape
    group = H // k.shape[1]
    qs = q_stored(q.reshape(-1, hd)).reshape(q.shape)
    out = np.zeros((n, H, hd))
    for p in range(n):
        for h in range(H):
            s = k[:p + 1, h // group] @ qs[p, h] * scale
            e = np.exp(s - s.max())
            out[p, h] = (e / e.sum()).astype(np.float16).astype(np.float64) @ v[:p + 1, h // group]
    return out


@pytest.mark.parametrize("H,KV", [(8, 8), (6, 2), (16, 2), (12, 1)], ids=["group1", "group3", "group8", "group12"])
@pytest.mark.parametrize("kt,vt", [("q8_0", "q8_0"), ("q4_0", "f16"), ("f16", "f16")])
def test_decode_attention_under_llamacpp_numerics(kt, vt, H, KV):
    """The decode kernel packs 8 dot products per vector, (positions x heads) as the group's size allows
    (1, 3, 8 and 8 + 4 heads per KV head here), over 32-position blocks and 256-position chunks (prompt of
    290, its last 10 tokens checked too, decode to 300). Under llama.cpp numerics q8_0 / q4_0 keys meet a q quantized to q8_0 (integer dots,
    as llama.cpp's flash attention), f16 keys an f16 q. Against float64 with those roundings; the native
    op bit for bit at 1 and 2 threads; the torch path the same within rounding. The q8_0 query shows:
    the same reference with an f16 query is much further from what the op gives."""
    hd, n_prompt, n = 64, 290, 300
    rng = np.random.default_rng(11)
    q = (rng.standard_normal((n, H, hd)) * 2).astype(F32)
    k = rng.standard_normal((n, KV, hd)).astype(F32)
    v = rng.standard_normal((n, KV, hd)).astype(F32)
    kr, vr = k_rotation(KV_TYPES[kt], hd), v_rotation(KV_TYPES[vt], hd)
    k64 = np_decode(np_encode(np_rotate(k, kr).reshape(-1, hd), kt), kt, hd).reshape(k.shape)
    v64 = np_decode(np_encode(np_rotate(v, vr).reshape(-1, hd), vt), vt, hd).reshape(v.shape)
    q8 = lambda x: np_decode(np_encode(x, "q8_0"), "q8_0", hd)                  # noqa: E731
    f16 = lambda x: x.astype(np.float16).astype(np.float64)                      # noqa: E731
    scale = 1 / np.sqrt(hd)
    refs = {}
    for name, q_stored in (("q8_0", q8), ("f16", f16)):
        ref = _attention64_llamacpp(np_rotate(q, kr), k64, v64, scale, q_stored)[n_prompt - 10:]
        refs[name] = (ref.reshape(-1, hd // vr, vr) @ hadamard64(vr)).reshape(ref.shape) if vr else ref
    runs = _attention_runs(q, k, v, KV, kt, vt, LLAMACPP, scale, n_prompt, prompt_rows=10)
    assert np.array_equal(runs[True, 1], runs[True, 2])
    want, other = ("q8_0", "f16") if kt in ("q8_0", "q4_0") else ("f16", "q8_0")
    for key, got in runs.items():
        err, err_other = np.abs(got - refs[want]).max(), np.abs(got - refs[other]).max()
        assert err < 2e-3, (kt, vt, H, KV, key, err)
        assert err_other > 5 * err, (kt, vt, H, KV, key, err, err_other)


def test_the_memory_plan_counts_the_type(tmp_path):
    windows = (0, 0, 8)
    for kt, vt in (("q8_0", "q4_0"), ("f16", "f16"), ("bf16", "f32")):
        cache = KVCache(3, 2, 64, 2, 64, "cpu", kt, windows=windows, v_type=vt)
        planned = KVCache.planned_bytes(windows, 2, 64, 2, 64, (kt, vt))
        assert cache.nbytes == planned
        rows = 2 * (64 + 64 + 8) * 2                  # slots x entries x KV heads
        assert planned == rows * (KV_TYPES[kt].row_bytes(64) + KV_TYPES[vt].row_bytes(64))
    assert KV_TYPES["q8_0"].row_bytes(64) == 68 and KV_TYPES["q4_0"].row_bytes(64) == 36


def _world_logits(path, world, ids, kv_types):
    gf, cfg = open_model(path)
    plan = make_plan(cfg, gf.tensors, world)
    tw = ThreadWorld(world)
    models = [RankModel(cfg, plan.ranks[r], world, tw.reducer(r) if world > 1 else no_reduce, gf,
                        choose_kernels("cpu", LLAMACPP)) for r in range(world)]
    for m in models:
        m.allocate_cache(1, 64, kv_types=kv_types)
    n = len(ids)
    out = [torch.cat(tw.run(lambda r: models[r].forward(torch.tensor(ids[:n - 3]), torch.arange(n - 3),
                                                        torch.zeros(n - 3, dtype=torch.long))), -1)]
    for p in range(n - 3, n):          # decode steps read the quantized cache back
        out.append(torch.cat(tw.run(lambda r: models[r].forward(torch.tensor([ids[p]]), torch.tensor([p]),
                                                                torch.zeros(1, dtype=torch.long),
                                                                torch.tensor([0]))), -1))
    return torch.cat(out)


def test_a_quantized_cache_gives_the_same_logits_at_1_and_2_ranks(tmp_path):
    path = write_model(tmp_path / "m.gguf", "llama", n_embd=256, n_heads=4, n_kv=2, n_ff=512, vocab=300)
    ids = [5, 17, 290, 3, 3, 44, 120, 7, 251, 60, 9, 0, 33, 34]
    one = _world_logits(path, 1, ids, ("q8_0", "q4_0"))
    assert torch.equal(_world_logits(path, 2, ids, ("q8_0", "q4_0")), one)
    f16 = _world_logits(path, 1, ids, ("f16", "f16"))
    assert not torch.equal(one, f16)                               # the cache type shows in the logits
    q8 = _world_logits(path, 1, ids, ("q8_0", "q8_0"))
    rms = lambda t: float(t.pow(2).mean().sqrt())                  # noqa: E731
    assert rms(q8 - f16) < 0.04 * rms(f16) and rms(one - f16) < 0.2 * rms(f16), (rms(q8 - f16), rms(one - f16))


def test_info_and_generate_take_the_cache_types(smollm2_path):
    """info plans each rank's cache at its type (q8_0 k and q4_0 v: 52 bytes per 32 values of a head's k
    and v, against 128 in f16), generate runs across 2 workers with a quantized cache, and an unknown
    type is refused in one line."""
    import json
    plans = {}
    for flags in ((), ("-ctk", "q8_0", "-ctv", "q4_0")):
        r = run_cli("info", str(smollm2_path), "--nproc-per-node", "2", "-c", "4096", "--json", *flags)
        assert r.returncode == 0, r.stderr
        plans[flags] = json.loads(r.stdout)["world_plan"]
    f16, quant = plans.values()
    assert quant["kv_types"] == ["q8_0", "q4_0"] and f16["kv_types"] == ["f16", "f16"]
    for a, b in zip(f16["ranks"], quant["ranks"]):
        assert b["kv_cache"] * 128 == a["kv_cache"] * (34 + 18)          # per 32 values: 64 + 64 -> 34 + 18 bytes
    r = run_cli("generate", "-m", str(smollm2_path), "--nproc-per-node", "2", "-ctk", "q8_0", "-ctv", "q4_0",
                "-p", "The capital of France is", "-n", "8", "--temp", "0")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = run_cli("generate", "-m", str(smollm2_path), "-ctk", "q5_1", "-p", "x", "-n", "1")
    assert r.returncode != 0 and "q5_1" in r.stderr and "Traceback" not in r.stderr

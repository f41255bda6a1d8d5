"""Fixed-shape decode steps (model/decode_graphs.py): the bucketing, and the buckets' results.

On a CPU the buckets run in mode "eager": the same static buffers, padding rows, scratch slot and
fixed-shape attention a CUDA graph holds, without the capture. Each decode step through them must
give the logits the step-at-a-time forward gives (a model without buckets, fed the same steps), on
a llama file and on a gemma3 file whose sliding-window layers read a ring. On a GPU the same test
runs with mode "cuda" (captured graphs replayed)."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from synthetic import write_model
from tensorsplit.kernels.choice import choose_kernels
from tensorsplit.model import make_plan, open_model
from tensorsplit.model.decode_graphs import DecodeGraphs, kv_bucket, row_bucket
from tensorsplit.model.layers import no_reduce
from tensorsplit.kernels.numerics import Numerics
from tensorsplit.model.transformer import RankModel

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def test_row_buckets():
    assert [row_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert row_bucket(17) is None
    assert row_bucket(3, (2, 6)) == 6


def test_kv_buckets_are_powers_of_two_from_256_capped_by_the_context():
    assert kv_bucket(0, 4096) == 256 and kv_bucket(255, 4096) == 256
    assert kv_bucket(256, 4096) == 512 and kv_bucket(1000, 4096) == 1024
    assert kv_bucket(3000, 4096) == 4096
    assert kv_bucket(5, 100) == 100 and kv_bucket(99, 100) == 100         # a short context is one bucket
    assert kv_bucket(700, 768) == 768
    with pytest.raises(AssertionError):
        kv_bucket(100, 100)                                                # past the context: checked before


def test_fits_one_token_per_slot_and_at_most_the_largest_bucket():
    g = DecodeGraphs(lambda *a: None, torch.device("cpu"), 64, 4, "eager")
    assert g.fits(torch.tensor([0, 1, 3]))
    assert not g.fits(torch.tensor([0, 0]))                    # a prompt chunk: several tokens of one slot
    assert not g.fits(torch.arange(17))
    assert not g.fits(torch.tensor([], dtype=torch.int64))


def test_padding_rows_go_to_the_scratch_slot_and_buffers_are_reused():
    seen = []

    def step(ids, positions, slots, kv_len):
        seen.append((ids.tolist(), positions.tolist(), slots.tolist(), kv_len))
        return ids[:, None].float() * torch.ones(1, 3)
    g = DecodeGraphs(step, torch.device("cpu"), 1024, 7, "eager")
    out = g.run(torch.tensor([5, 6, 9]), torch.tensor([10, 300, 2]), torch.tensor([0, 2, 1]))
    assert out.tolist() == [[5.0] * 3, [6.0] * 3, [9.0] * 3]
    assert seen[-1] == ([5, 6, 9, 0], [10, 300, 2, 0], [0, 2, 1, 7], 512)
    g.run(torch.tensor([1]), torch.tensor([3]), torch.tensor([0]))
    g.run(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([0, 1]))
    g.run(torch.tensor([4, 3, 2]), torch.tensor([11, 301, 3]), torch.tensor([0, 2, 1]))
    assert sorted(g._buckets) == [(1, 256), (2, 256), (4, 512)]
    assert g.replays == 4 and g.captured == 0


def _model(path, device, numerics, graphs, native=True):
    """native: the native kernels on a CPU where they load (False: the torch kernels a GPU would run)."""
    gf, cfg = open_model(path)
    m = RankModel(cfg, make_plan(cfg, gf.tensors, 1).ranks[0], 1, no_reduce, gf, choose_kernels(device, numerics, native))
    m.allocate_cache(4, 64, decode_graphs=graphs)
    return m


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    # SmolLM2's head layout (9 heads, 3 KV heads of 64) in Q4_1, written here: the GPU check runs this
    # file on a machine that cannot fetch the real model
    from gguf import GGMLQuantizationType as Q
    return write_model(tmp_path_factory.mktemp("dg") / "llama.gguf", "llama", n_layers=3, n_embd=576, n_heads=9,
                       n_kv=3, n_ff=1536, vocab=512, init="fan_in", types={k: Q.Q4_1 for k in (
                           "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")})


@pytest.fixture(scope="module")
def gemma3_file(tmp_path_factory):
    # 6 layers: 5 sliding-window layers (window 4, so decode reads the ring past its wrap) and 1 global
    return write_model(tmp_path_factory.mktemp("dg") / "gemma3.gguf", "gemma3", n_layers=6, n_embd=128, n_heads=4,
                       n_kv=2, n_ff=256, vocab=256, window=4, init="fan_in")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numerics", ["llamacpp", "exact"])
@pytest.mark.parametrize("which", ["llama", "gemma3"])
def test_decode_through_buckets_equals_the_step_at_a_time_forward(which, numerics, device, llama_file, gemma3_file):
    """Three sequences of different prompt lengths in slots 0, 2, 3 (slot 1 unused), prefilled eagerly;
    then decode steps of 3, 2 and 1 rows (padded to buckets 4, 2, 1), each compared with the same
    step on a model without buckets. Slot 1 and the other slots' caches stay as the reference's."""
    path = llama_file if which == "llama" else gemma3_file
    num = Numerics(numerics)
    ref = _model(path, device, num, None)
    fixed = _model(path, device, num, "cuda" if device == "cuda" else "eager")
    g = torch.Generator().manual_seed(0)
    vocab = ref.cfg.vocab_size
    prompts = {0: 7, 2: 3, 3: 12}
    for slot, n in prompts.items():
        ids = torch.randint(0, vocab, (n,), generator=g)
        for m in (ref, fixed):
            m.forward(ids, torch.arange(n), torch.full((n,), slot))
    pos = dict(prompts)
    worst = 0.0
    for step in range(9):
        slots = [0, 2, 3] if step < 4 else [3, 0] if step < 7 else [2]
        ids = torch.randint(0, vocab, (len(slots),), generator=g)
        positions = torch.tensor([pos[s] for s in slots])
        want = ref.forward(ids, positions, torch.tensor(slots))
        got = fixed.forward(ids, positions, torch.tensor(slots))
        assert got.shape == want.shape
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        if numerics == "exact":
            assert torch.equal(got.argmax(-1), want.argmax(-1))
        for s in slots:
            pos[s] += 1
    # exact: masked-out positions add exact zeros; what differs is only the order of float32 sums.
    # llamacpp: the 8-bit rounding of each matmul input turns such last-bit differences into flipped
    # codes, which 30 layers grow to ~2% of the logits (as between world sizes before partial sums
    # were kept in float64, see layers.RowParallelLinear); the logic is checked by the exact case.
    assert worst < (1e-5 if numerics == "exact" else 5e-2), worst
    assert fixed.graphs.replays == 9 and len(fixed.graphs._buckets) == 3
    if device == "cuda":
        assert fixed.graphs.captured == 3


def test_a_prompt_chunk_runs_eagerly(llama_file):
    m = _model(llama_file, "cpu", Numerics(), "eager")
    m.forward(torch.tensor([1, 2, 3]), torch.arange(3), torch.zeros(3, dtype=torch.int64))
    assert m.graphs.replays == 0
    m.forward(torch.tensor([4]), torch.tensor([3]), torch.tensor([0]))
    assert m.graphs.replays == 1


def test_logit_rows_select_from_a_bucket(llama_file):
    a = _model(llama_file, "cpu", Numerics(), "eager")
    b = _model(llama_file, "cpu", Numerics(), None)
    for m in (a, b):
        m.forward(torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    got = a.forward(torch.tensor([5, 6]), torch.tensor([1, 1]), torch.tensor([0, 1]), torch.tensor([1]))
    want = b.forward(torch.tensor([5, 6]), torch.tensor([1, 1]), torch.tensor([0, 1]), torch.tensor([1]))
    assert got.shape == want.shape == (1, a.cfg.vocab_size)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


class _SyncingOps(TorchDispatchMode):
    """The aten ops that make the host wait for the device: a value read back, or an output whose size
    depends on the data."""
    SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
               "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"}

    def __init__(self, seen: list[str]):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


class _HostCopies(TorchFunctionMode):
    """The tensor methods that copy to the host. On a CPU tensor some reach no aten op (`.tolist()`,
    `.cpu()` and `.numpy()` read the memory in place), so only the torch-function layer sees them; on a
    GPU each is a device-to-host copy that a capture cannot hold. (`.to(device)` is not counted: on the
    CPU standing in for the GPU, the model's own `.to(self.device)` looks the same as a copy home.)"""
    COPYING = {"tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "item", "equal"}

    def __init__(self, seen: list[str]):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.COPYING:
            self.seen.append(f"Tensor.{name}" if name != "equal" else "torch.equal")
        return func(*args, **(kwargs or {}))


class _HostSyncs:
    """Records what would make a CUDA graph capture fail: the syncing aten ops and the host copies.
    `with _HostSyncs() as log: ...; log.seen`"""

    def __enter__(self):
        self.seen: list[str] = []
        self._modes = [_HostCopies(self.seen), _SyncingOps(self.seen)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


def test_the_host_sync_detector_sees_one():
    with _HostSyncs() as log:
        int(torch.tensor([3, 4]).max())
        torch.tensor([0, 1]).nonzero()
    assert "_local_scalar_dense" in log.seen and "nonzero" in log.seen


PROBES = {   # what a careless line in a decode step might do, each a wait on the device
    "tolist": lambda t: t.tolist(),
    "cpu": lambda t: t.cpu(),
    "float of a 0-d tensor": lambda t: float(t.sum()),
    "torch.equal": lambda t: torch.equal(t, t),
    "numpy": lambda t: t.numpy(),
    "bool": lambda t: bool(t.sum() > 0),
    "item": lambda t: t.sum().item(),
    "nonzero": lambda t: t.nonzero(),
}


@pytest.mark.parametrize("probe", list(PROBES))
def test_a_host_sync_inserted_in_the_step_is_seen(probe, llama_file, monkeypatch):
    """Each probe, inserted in the fixed-shape step's attention, makes the check below fail."""
    from tensorsplit.model.attention import Attention
    m = _model(llama_file, "cpu", Numerics("llamacpp"), "eager", native=False)
    m.forward(torch.tensor([3, 1, 4]), torch.arange(3), torch.zeros(3, dtype=torch.int64))
    original = Attention.decode_static

    def probed(self, q, *args, **kwargs):
        PROBES[probe](q.detach())
        return original(self, q, *args, **kwargs)
    monkeypatch.setattr(Attention, "decode_static", probed)
    with _HostSyncs() as log:
        m._static_step(torch.tensor([9]), torch.tensor([3]), torch.tensor([0]), kv_bucket(3, m.cache.n_ctx))
    assert log.seen, f"{probe} was not seen"


@pytest.mark.parametrize("numerics", ["llamacpp", "exact"])
@pytest.mark.parametrize("which", ["llama", "gemma3"])
def test_the_fixed_shape_step_never_waits_for_the_device(which, numerics, llama_file, gemma3_file):
    """What a GPU captures, checked on the CPU: the fixed-shape step of the portable torch path (the one
    a GPU runs, native kernels off) issues no op that reads a value back to the host, so its capture
    cannot fail on one. Run over a prefilled slot and a padded bucket with the scratch slot."""
    m = _model(llama_file if which == "llama" else gemma3_file, "cpu", Numerics(numerics), "eager", native=False)
    m.forward(torch.tensor([3, 1, 4, 1, 5]), torch.arange(5), torch.zeros(5, dtype=torch.int64))
    ids, positions = torch.tensor([9, 0]), torch.tensor([5, 0])
    slots = torch.tensor([0, m.cache.scratch_slot])
    with _HostSyncs() as log:
        logits = m._static_step(ids, positions, slots, kv_bucket(5, m.cache.n_ctx))
    assert log.seen == [], log.seen
    assert logits.shape == (2, m.cfg.vocab_size) and torch.isfinite(logits).all()

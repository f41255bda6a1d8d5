"""comm/backend.py's choice of torch.distributed backend, for every combination of device kinds,
with and without each backend in the torch build. Pure logic: the availability checks are
replaced, so no GPU is needed. The table below is written from the README ("NCCL on CUDA (RCCL on
a ROCm build), XCCL on XPU, Gloo on CPU, Gloo staged through host memory for mixed devices"), not
from the code."""
from __future__ import annotations

import itertools

import pytest
import torch

import tensorsplit.comm.backend as backend
from tensorsplit.comm import choose_backend
from tensorsplit.errors import TensorsplitError

KINDS = ("cpu", "cuda", "xpu", "mps")
STAGED = "Gloo, staged through host memory"

# every set of device kinds a world can hold -> (backend, staging, reason) with every backend built in
AUTO = {
    ("cpu",): ("gloo", False, "every rank on the CPU: Gloo"),
    ("cuda",): ("nccl", False, "every rank on a GPU: NCCL"),
    ("xpu",): ("xccl", False, "every rank on an XPU: XCCL"),
    ("mps",): ("gloo", True, f"devices ['mps']: {STAGED}"),
    ("cpu", "cuda"): ("gloo", True, f"devices ['cpu', 'cuda']: {STAGED}"),
    ("cpu", "xpu"): ("gloo", True, f"devices ['cpu', 'xpu']: {STAGED}"),
    ("cpu", "mps"): ("gloo", True, f"devices ['cpu', 'mps']: {STAGED}"),
    ("cuda", "xpu"): ("gloo", True, f"devices ['cuda', 'xpu']: {STAGED}"),
    ("cuda", "mps"): ("gloo", True, f"devices ['cuda', 'mps']: {STAGED}"),
    ("xpu", "mps"): ("gloo", True, f"devices ['mps', 'xpu']: {STAGED}"),
    ("cpu", "cuda", "xpu"): ("gloo", True, f"devices ['cpu', 'cuda', 'xpu']: {STAGED}"),
    ("cpu", "cuda", "mps"): ("gloo", True, f"devices ['cpu', 'cuda', 'mps']: {STAGED}"),
    ("cpu", "xpu", "mps"): ("gloo", True, f"devices ['cpu', 'mps', 'xpu']: {STAGED}"),
    ("cuda", "xpu", "mps"): ("gloo", True, f"devices ['cuda', 'mps', 'xpu']: {STAGED}"),
    ("cpu", "cuda", "xpu", "mps"): ("gloo", True, f"devices ['cpu', 'cuda', 'mps', 'xpu']: {STAGED}"),
}


@pytest.fixture
def built(monkeypatch):
    """built(*names): pretend this torch build has exactly these backends (and no ROCm)."""
    monkeypatch.setattr(torch.version, "hip", None, raising=False)

    def set_built(*names):
        monkeypatch.setattr(backend, "_available", lambda name: name in names)
    set_built("nccl", "gloo", "xccl")
    return set_built


def _world(kinds):
    """A world of 4 ranks over `kinds`, repeating them (the choice depends only on the set)."""
    return [kinds[i % len(kinds)] for i in range(4)]


def test_the_table_covers_every_combination():
    subsets = {c for n in range(1, 5) for c in itertools.combinations(KINDS, n)}
    assert set(AUTO) == subsets


@pytest.mark.parametrize("kinds", list(AUTO), ids=["+".join(k) for k in AUTO])
def test_auto_choice(built, kinds):
    got = choose_backend(_world(kinds))
    assert (got.name, got.staging, got.why) == AUTO[kinds]


def test_rocm_build_says_rccl(built, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    got = choose_backend(["cuda", "cuda"])
    assert (got.name, got.staging, got.why) == ("nccl", False, "every rank on a GPU: RCCL")


@pytest.mark.parametrize("kinds,missing", [(("cuda",), "nccl"), (("xpu",), "xccl")])
def test_without_the_device_backend_gloo_stages(built, kinds, missing):
    built(*({"nccl", "gloo", "xccl"} - {missing}))
    got = choose_backend(_world(kinds))
    assert (got.name, got.staging, got.why) == ("gloo", True, f"devices ['{kinds[0]}']: {STAGED}")


def test_without_gloo(built):
    built("nccl", "xccl")
    assert choose_backend(["cuda", "cuda"]).name == "nccl"
    assert choose_backend(["xpu"]).name == "xccl"
    for kinds in [("cpu",), ("mps",), ("cpu", "cuda")]:
        with pytest.raises(TensorsplitError, match="this torch build has no gloo backend, and the devices need it"):
            choose_backend(_world(kinds))


@pytest.mark.parametrize("override,kinds,staging", [
    ("nccl", ("cuda",), False), ("xccl", ("xpu",), False),
    ("gloo", ("cpu",), False), ("gloo", ("cuda",), True), ("gloo", ("mps",), True), ("gloo", ("cpu", "cuda"), True),
    ("gloo", ("cpu", "cuda", "xpu", "mps"), True),
])
def test_override(built, override, kinds, staging):
    got = choose_backend(_world(kinds), override)
    assert (got.name, got.staging, got.why) == (override, staging, "--backend")


@pytest.mark.parametrize("override,kinds,message", [
    ("nccl", ("cpu", "cuda"), "--backend nccl needs every rank on a GPU; ranks use ['cpu', 'cuda']"),
    ("nccl", ("xpu",), "--backend nccl needs every rank on a GPU; ranks use ['xpu']"),
    ("xccl", ("cuda",), "--backend xccl needs every rank on an XPU; ranks use ['cuda']"),
    ("xccl", ("cpu", "xpu"), "--backend xccl needs every rank on an XPU; ranks use ['cpu', 'xpu']"),
    ("mpi", ("cpu",), "--backend 'mpi' is not known; choose one of nccl, gloo, xccl"),
])
def test_override_refused(built, override, kinds, message):
    with pytest.raises(TensorsplitError) as e:
        choose_backend(_world(kinds), override)
    assert str(e.value) == message


def test_override_missing_from_the_build(built):
    built("gloo")
    with pytest.raises(TensorsplitError) as e:
        choose_backend(["cuda"], "nccl")
    assert str(e.value) == f"--backend nccl: this torch build ({torch.__version__}) has no nccl support"

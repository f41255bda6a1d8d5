"""Every GPU kernel the launcher can pick compiles for the GPUs users have, with no register spills on
sm_90, checked on this CPU-only machine: Triton compiles for a named target without a device, and the
ptxas and cuobjdump its wheel ships say how many registers each kernel takes (kernels/gpu/offline.py).
The interpreter (tests/test_triton_kernels.py) checks what the kernels compute; this checks that the
same source becomes GPU code: an operation the interpreter accepts and the compiler does not, or a
tile too large for the register file, fails here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="no Triton wheel for this machine (scripts/setup.sh installs one where it can)")

from tensorsplit.kernels.gpu.matmul import GEMV_MAX_ROWS  # noqa: E402
from tensorsplit.kernels.gpu.offline import ROWS  # noqa: E402
from tensorsplit.kernels.layout import FORMATS  # noqa: E402

# sm_90 (H100/H200) at every row count the launcher picks: the spill and occupancy checks below are
# made there. The other targets at the one-row gemv and the largest gemm (the 16-row gemv and the
# smaller gemm tile are sm_90's alone, to keep CI short): a compile failure there is a construct the target lacks, not
# a tile size, and a full sweep of four targets cost CI about 7 minutes.
TARGETS = {"sm_90": ROWS, "sm_86": (1, 512), "gfx942": (1, 512), "gfx1100": (1, 512)}
GEMV_REGISTER_CAP = 128      # a 1-row gemv above it runs fewer than 4 programs of 4 warps per SM


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = []
    for rows in dict.fromkeys(TARGETS.values()):
        targets = ",".join(t for t, r in TARGETS.items() if r == rows)
        r = subprocess.run([sys.executable, "-m", "tensorsplit.kernels.gpu.offline", "--targets", targets,
                            "--rows", ",".join(map(str, rows)), "--json"], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.stdout.strip(), r.stderr[-3000:]
        out += json.loads(r.stdout)
    return out


@pytest.mark.slow
def test_every_kernel_compiles_for_nvidia_and_amd_targets(compiled):
    """Every format at every row count, and at prompt-sized rows the gemm in both numerics: fp16
    operands (llamacpp) and ieee float32 (exact), whose tl.dot lowers differently."""
    formats = sorted(t for t, f in FORMATS.items() if f.act is not None)
    gemm_rows = [m for m in ROWS if m > GEMV_MAX_ROWS]
    assert set(TARGETS["sm_90"]) == set(ROWS)
    assert gemm_rows
    assert {(c["target"], c["type_id"], c["rows"], c["fp16"]) for c in compiled} == {
        (t, q, m, fp16) for t, rows in TARGETS.items() for q in formats for m in rows
        for fp16 in ((True, False) if m in gemm_rows else (None,))}
    failed = [f"{c['target']} type {c['type_id']} rows {c['rows']}: {c['error']}" for c in compiled
              if c["error"] or c["registers"] <= 0]
    assert not failed, "\n".join(failed)
    kinds = {c["kernel"] for c in compiled}
    assert kinds == {"gemv_words", "gemv", "gemm"}, kinds


@pytest.mark.slow
def test_no_kernel_spills_on_sm_90_and_the_gemvs_leave_room_for_occupancy(compiled):
    """No spill at any row count; at one row (a single sequence's decode step, what the GPU check times)
    every gemv leaves room for 4 programs per SM."""
    sm90 = [c for c in compiled if c["target"] == "sm_90"]
    spills = [(c["type_id"], c["rows"], c["kernel"], c["spilled_bytes"]) for c in sm90 if c["spilled_bytes"]]
    assert not spills, spills
    heavy = [(c["type_id"], c["rows"], c["registers"]) for c in sm90
             if c["kernel"] != "gemm" and c["rows"] == 1 and c["registers"] > GEMV_REGISTER_CAP]
    assert not heavy, heavy

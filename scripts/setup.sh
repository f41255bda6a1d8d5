#!/usr/bin/env bash
# Set up a virtual environment in .venv with tensorsplit and its test dependencies.
# torch is pinned so that a CPU-only machine gets the CPU build (an unpinned torch can pull a
# several-GB CUDA build). On a GPU machine, install the torch build for your CUDA/ROCm first
# and set TENSORSPLIT_TORCH="" to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TENSORSPLIT_TORCH-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PY --version)" >&2
    "$PY" -m venv .venv
fi
if [ -n "$TORCH_SPEC" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC" >&2
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
.venv/bin/python -m pip install -q -e ".[test]"
# Triton: the GPU kernels' language. A GPU build of torch brings its own (CUDA's triton, ROCm's
# pytorch-triton-rocm), which is kept; on a CPU-only machine the tests run the same kernels under
# Triton's interpreter, so install it there (pinned; x86-64 and aarch64 Linux wheels only)
if ! .venv/bin/python -c "import triton" 2>/dev/null; then
    echo "setup: installing triton==${TENSORSPLIT_TRITON_VERSION:-3.9.0} (the GPU kernels' tests run under its interpreter)" >&2
    .venv/bin/python -m pip install -q "triton==${TENSORSPLIT_TRITON_VERSION:-3.9.0}" \
        || echo "setup: no triton wheel for this machine; tests/test_triton_kernels.py will be skipped" >&2
fi
# compile the native CPU kernels now (about a minute, once) rather than at the first run; without a
# C++ compiler this prints why, and tensorsplit runs on its (slower) torch path
.venv/bin/python -c "from tensorsplit import kernels; kernels.native()"
echo "setup: ready (.venv/bin/tensorsplit)" >&2

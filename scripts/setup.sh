#!/usr/bin/env bash
# Set up a virtual environment in .venv with tensorsplit and its test dependencies.
# torch is pinned to 2.13.0. Which build: on plain PyPI, torch==2.13.0 for Linux x86-64 is the CUDA
# build (several GB; it runs on a CPU too). On a machine with no GPU visible, set-up first asks
# PyTorch's CPU index (TENSORSPLIT_TORCH_INDEX, default below; a 5 s probe) and takes the CPU build
# (~200 MB) from there; where that index cannot be reached it installs from pip's configured index
# (a mirror may carry the CPU build; PyPI gives the CUDA one). TENSORSPLIT_TORCH_INDEX="" skips the
# probe. On a GPU machine, install the torch build for your CUDA/ROCm first and set
# TENSORSPLIT_TORCH="" to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TENSORSPLIT_TORCH-torch==2.13.0}
CPU_INDEX=${TENSORSPLIT_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PY --version)" >&2
    "$PY" -m venv .venv
fi
no_gpu() { ! command -v nvidia-smi >/dev/null 2>&1 && [ ! -e /dev/kfd ]; }
reachable() {
    .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" \
        "$1" 2>/dev/null
}
if [ -n "$TORCH_SPEC" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "$CPU_INDEX" ] && no_gpu && reachable "$CPU_INDEX"; then
        echo "setup: installing $TORCH_SPEC, the CPU build (no GPU here), from $CPU_INDEX" >&2
        .venv/bin/python -m pip install -q "$TORCH_SPEC" --index-url "$CPU_INDEX"
    else
        echo "setup: installing $TORCH_SPEC from pip's index${CPU_INDEX:+ ($CPU_INDEX not used: a GPU is visible or it cannot be reached)}" >&2
        .venv/bin/python -m pip install -q "$TORCH_SPEC"
    fi
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

#!/usr/bin/env bash
# The GPU path, checked and timed in one go on a machine with one NVIDIA GPU (under 8 minutes).
#
#   bash scripts/gpu_check.sh [--wheels DIR] [--out DIR] [--rehearse]
#
# Needs only what such a machine has: Python with PyTorch (CUDA build), Triton and NumPy. Any other
# module tensorsplit or the tests import (gguf, click, jinja2, tokenizers, pytest, ninja, ...) is
# unpacked from the wheels in DIR (default .wheels; scripts/gpu_check_wheels.sh fills it) into
# OUT/site, without pip or a network. The synthetic models are written on the spot. Results go to
# OUT (default gpu-check-out): gpu_check.json and gpu_check.md. --rehearse runs every step on the
# CPU instead (Triton under its interpreter), to try the script on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.wheels
OUT=gpu-check-out
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --rehearse) PASS+=(--rehearse); shift ;;
        *) echo "gpu_check: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SITE="$(cd "$OUT" && pwd)/site"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" scripts/install_wheels.py "$WHEELS" "$SITE" gguf yaml=pyyaml tqdm click jinja2 markupsafe tokenizers \
    pytest pluggy iniconfig packaging pygments ninja \
    $("$PY" -c 'import sys; print("exceptiongroup tomli" if sys.version_info < (3, 11) else "")')
# the native CPU kernels (the CPU rank of a cuda,cpu world) build with ninja, which torch looks for on PATH
for bin in "$SITE"/ninja-*.data/scripts; do
    [ -x "$bin/ninja" ] && export PATH="$PATH:$bin"
done
export TENSORSPLIT_CACHE="$(cd "$OUT" && pwd)/cache"
exec timeout 470 "$PY" scripts/gpu_check.py --out "$OUT" "${PASS[@]}"

#!/usr/bin/env bash
# Fill .wheels/ with the wheels scripts/gpu_check.sh may need on a machine that has only PyTorch,
# Triton and NumPy (about 9 MiB): pure-Python wheels, tokenizers for any CPython >= 3.10, and
# PyYAML and MarkupSafe built for CPython 3.10 to 3.14 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(.venv/bin/python -m pip download -q --no-deps -d .wheels)
mkdir -p .wheels
"${PIP[@]}" gguf==0.19.0 tqdm click jinja2 tokenizers ninja pytest pluggy iniconfig packaging pygments exceptiongroup \
    typing_extensions
"${PIP[@]}" --only-binary=:all: --platform any --python-version 3.10 tomli
for v in 3.10 3.11 3.12 3.13 3.14; do
    "${PIP[@]}" --only-binary=:all: --python-version "$v" --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 pyyaml markupsafe
done
du -sh .wheels

#!/usr/bin/env bash
# Download the wheels the GPU benchmark's peer needs into .whl/ (ignored by git), on a machine with
# PyPI access: EleutherAI sparsify 1.3.3 and the three packages it imports that the GPU image lacks
# (natsort, simple-parsing and its docstring-parser; torch, transformers, accelerate, einops,
# safetensors and huggingface-hub are in the image). Python 3.12, x86-64, pure-Python wheels: about
# 0.3 MB, carried with `carry: [".whl"]`; bench/gpu/run.sh installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' .git/info/exclude 2>/dev/null \
    || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
for pkg in eai-sparsify==1.3.3 natsort==8.4.0 simple-parsing==0.1.9 docstring-parser==0.18.0; do
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg"
done
ls -l .whl

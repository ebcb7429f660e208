#!/usr/bin/env bash
# Download the wheels the GPU benchmark needs beyond the GPU image into .whl/ (ignored by git), on a machine
# with PyPI access. Python 3.12, x86-64; carried with `carry: [".whl"]`, installed by bench/gpu/run.sh into
# /tmp/site.
#   table    EleutherAI sparsify 1.3.3 and the three packages it imports that the image lacks (natsort,
#            simple-parsing and its docstring-parser; torch, transformers, accelerate, einops, safetensors
#            and huggingface-hub are in the image): pure Python, ~0.3 MB.
#   collect  datasets 5.2.0 (the collector streams text through it) with dill and multiprocess, which the
#            image lacks, and pyarrow 26 (~45 MB; datasets needs >= 24, run.sh installs it only when the
#            image's is older).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' .git/info/exclude 2>/dev/null \
    || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
for pkg in eai-sparsify==1.3.3 natsort==8.4.0 simple-parsing==0.1.9 docstring-parser==0.18.0 \
           datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1; do
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg"
done
ls -l .whl

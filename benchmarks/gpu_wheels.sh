#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels gileak needs on a GPU machine that has
# PyTorch but no package registry (the device machines: Python 3.12, torch 2.11, torchvision
# 0.26, numpy, scipy, scikit-image, scikit-learn, pandas, pillow, tqdm, opt-einsum, pluggy, rich,
# typer, matplotlib, jinja2, hypothesis, pytest — but no pydantic, opacus, lpips or medmnist).
# They land in gpu-wheels/ (git-ignored), which benchmarks/gpu_check.sh installs with
# `pip install --no-index --no-deps --target ...`; carry the folder with the device run.
#
# Usage: benchmarks/gpu_wheels.sh [DEST]      (GPU_PYTHON_VERSION=3.12 by default)
#
# The set is gileak's run-time imports the image lacks, with their own requirements resolved by
# hand (pip download --no-deps: nothing else is fetched), pinned to the versions tested here:
#   pydantic -> pydantic-core, annotated-types, typing-inspection, typing-extensions (>= 4.14.1,
#               newer than some images carry; installed into the target it shadows theirs)
#   opacus   -> numpy, scipy, opt-einsum, torch (image)
#   lpips    -> numpy, scipy, tqdm, torch, torchvision (image)
#   medmnist -> fire -> termcolor; numpy, pandas, scikit-learn, scikit-image, tqdm, Pillow (image)
# scikit-learn (the embedded `digits` set) is in the image. No torch or torchvision here: the
# image's own are the ones to test.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-gpu-wheels}
PY_VERSION=${GPU_PYTHON_VERSION:-3.12}
PYTHON=${PYTHON:-python3}
WHEELS=(
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.15.0
    opacus==1.6.0 lpips==0.1.4 medmnist==3.0.2 fire==0.7.1 termcolor==3.3.0
)
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
    echo "expected ${#WHEELS[@]} wheels in $DEST, found $count (two versions of one package stop the install)" >&2
    exit 1
fi
du -sh "$DEST"
ls "$DEST"

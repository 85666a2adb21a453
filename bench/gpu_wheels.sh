#!/usr/bin/env bash
# Fetch, on the development machine, the wheels that bench/gpu_check.sh and bench/gpu_accuracy.sh
# need on a GPU machine whose image has torch, click, pyyaml, matplotlib, scikit-learn and fsspec
# but not zarr or faiss (Python 3.12, x86-64). They land in .whl/ (git-ignored, about 28 MiB); name
# .whl in the device call's carry list. Both scripts install them to /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 faiss-cpu==1.15.1

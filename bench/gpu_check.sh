#!/usr/bin/env bash
# Every GPU measurement and test of this project, in one script, for a short GPU session
# (about 9 minutes on an H100/H200). Run from the repo root:
#
#   bash bench/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT, else ./gpu-check
#
# Uses the python3 on PATH; packages it lacks (zarr, faiss-cpu, ...) may come as wheels in
# .whl/ (installed to /tmp/site first). Each step's output goes to OUT_DIR/<step>.log and a
# summary of the numbers to OUT_DIR/summary.txt. A failing step is recorded and the next runs.
set -u
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {   # step NAME TIMEOUT_S COMMAND...: run one step, log it, note its status and time
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    grep -E "images/s|ratio|c/a|c/d|passed|failed|skipped|error" "$out/$name.log" | tail -8 | tee -a "$out/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/summary.txt"
step cuda-tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_nbr_cuda.py tests/test_trainer_cuda.py
trainer="python3 -m trainer.cli"
step speed-bf16 90 $trainer speed --arch resnet18 --size 32 --batch-size 256 --n 50000 --device cuda --precision bf16
step speed-bf16-compiled 150 $trainer speed --arch resnet18 --size 32 --batch-size 256 --n 50000 --device cuda \
    --precision bf16 --compile
# The symmetric pass at ImageNet scale: (c) Triton tile kernel, (c') torch ops, (d) GEMM of the
# tiles it computes, (e) the full blocked fp32 matmul (target: c <= 1.6 e; anchor e ~5.1 s on an H200).
step rebuild-imagenet-scale 300 python3 -m nbr_index.cli bench --n 1281167 --device cuda --no-reference

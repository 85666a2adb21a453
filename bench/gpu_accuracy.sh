#!/usr/bin/env bash
# The GPU accuracy protocol (full CIFAR-10, ResNet18 with the CIFAR stem, 5 rounds x 50 epochs,
# batch 256, bf16, channels-last) for ONE (method, seed) per call, cut to fit a device command:
#
#   bash bench/gpu_accuracy.sh METHOD SEED [BUDGET_S]      # e.g. and 0 530
#
# Run it again with the same arguments on the same (still warm) machine to resume: the run's
# checkpoint stays in runs/accuracy/cifar10-gpu on that machine. When the run has finished, its
# result.json, summary.json and train log are copied to $OUT (files come back; checkpoints, at
# about 115 MB, cannot). Needs .whl/ (bench/gpu_wheels.sh) and .data/cifar10-jpg.tar.gz (a copy of
# ../shared/data/cifar10-jpg.tar.gz) carried: see bench/README.md.
set -u
method=${1:?METHOD (and, instance or and-oneoff)}
seed=${2:?SEED}
budget=${3:-530}
out="${OUT:-gpu-accuracy}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 bench/accuracy.py --protocol cifar10-gpu --methods "$method" --seeds "$seed" --threads 0 \
    --time-budget "$budget" --out-dir runs/accuracy/cifar10-gpu 2>&1 | tee "$out/accuracy.log"
run=runs/accuracy/cifar10-gpu/project-$method-seed$seed
tail -n 40 "$run/train.log" > "$out/train-tail.log" 2>/dev/null
for f in result.json summary.json linear_probe.json; do
    [ -f "$run/$f" ] && cp "$run/$f" "$out/$method-seed$seed-$f"
done
exit 0

#!/usr/bin/env bash
# A GPU session's second command, after bench/gpu_check.sh: the short GPU accuracy protocol
# (bench/accuracy.py cifar10-gpu-short: full CIFAR-10, ResNet18 with the CIFAR stem, 5 rounds x 10
# epochs, batch 256, bf16, channels-last), AND and then Instance, one seed, in one device command
# of at most 9 minutes. Run from anywhere in the checkout:
#
#   bash bench/gpu_accuracy.sh [OUT_DIR]               # on the GPU machine; OUT_DIR: $OUT, else ./gpu-accuracy
#   bash bench/gpu_accuracy.sh --rehearse [OUT_DIR]    # the same flow on CPU: digits, 5 rounds x 1 epoch
#
# The two runs share RUNS_S: AND gets half of it, Instance what is left, each through
# bench/accuracy.py --time-budget (a run cut short keeps its checkpoint on that machine; rerunning
# this on the same, still warm, machine resumes it). Sizing: a run is 2.5M training images, 100 to
# 170 s at the 15-25k images/s ResNet18 CIFAR at batch 256 bf16 channels-last may train at on an
# H100, plus about 80 s of start-up, JPEG decoding, per-epoch kNN, checkpoints and the linear
# probe: both fit RUNS_S from about 15k images/s (gpu_check.sh's speed-bf16 step measures it).
# EPOCHS=20 (5 x 20) fits from about 30k images/s. The paper's Nep = 50 (cifar10-gpu, 12.5M images
# a run) is for a GPU of one's own: bench/README.md.
#
# OUT_DIR gets 7 small files: accuracy.log (this script's output), accuracy.md and accuracy.json
# (the table of both runs, bench/accuracy.py's), and per method its summary.json (rounds, kNN per
# epoch) and the tail of its train.log. Checkpoints (~115 MB) cannot come back. Exit status: 0 when
# both runs finished, 1 when one did not, 2 when no GPU is visible. Needs, carried: .whl
# (bench/gpu_wheels.sh) and .data/cifar10-jpg.tar.gz (a copy of ../shared/data/cifar10-jpg.tar.gz).
# Environment: EPOCHS (10), SEED (0), RUNS_S (500: less where less device time is left), PYTHON (python3).
set -u

RUNS_S=${RUNS_S:-500}   # both runs, of the 540 s a 9-minute command has; ~40 s stay for set-up and the table

mode=gpu
if [ "${1:-}" = "--rehearse" ]; then
    mode=rehearse
    shift
fi
PY=${PYTHON:-python3}
out="${1:-${OUT:-gpu-accuracy}}"
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
seed=${SEED:-0}
if [ "$mode" = gpu ]; then
    protocol=cifar10-gpu-short
    epochs=${EPOCHS:-10}
else
    protocol=digits   # built in, smallcnn on CPU: the flow, not the accuracy
    epochs=${EPOCHS:-1}
    RUNS_S=300
fi
runs=runs/accuracy/$protocol-e$epochs   # kept on the machine: a rerun there resumes what was cut short
if [ "$mode" = rehearse ]; then         # a rehearsal starts afresh every time and leaves nothing behind
    runs=$(mktemp -d -t gpu-accuracy-rehearsal.XXXXXX) || exit 2
    trap 'rm -rf "$runs"' EXIT
fi
started=$SECONDS
log() { echo "$*" | tee -a "$out/accuracy.log"; }
: >"$out/accuracy.log"

if [ "$mode" = gpu ]; then
    if ! seen=$("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} on {p.name}, {p.total_memory / 2**30:.1f} GiB")' 2>&1); then
        echo "error: no CUDA GPU visible ($(echo "$seen" | tail -n 1)): run this on the GPU machine, or run" \
             "bash bench/gpu_accuracy.sh --rehearse on CPU" | tee -a "$out/accuracy.log" >&2
        exit 2
    fi
    log "gpu-accuracy: $protocol ($epochs epochs a round), seed $seed, AND then Instance in $RUNS_S s; $seen"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl 2>&1 | tee -a "$out/accuracy.log"
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
else
    log "gpu-accuracy rehearsal on CPU: $protocol ($epochs epochs a round), seed $seed, AND then Instance in $RUNS_S s"
fi

# accuracy METHOD BUDGET_S [FLAGS...]: bench/accuracy.py for one method of the protocol.
accuracy() {
    local method=$1 budget=$2
    shift 2
    "$PY" bench/accuracy.py --protocol "$protocol" --epochs "$epochs" --methods "$method" --implementations project \
        --seeds "$seed" --threads 0 --time-budget "$budget" --out-dir "$runs" "$@" 2>&1 | tee -a "$out/accuracy.log"
}
runs_started=$SECONDS   # the first call also unpacks the CIFAR-10 JPEGs, before its budget starts
accuracy and $((RUNS_S / 2))
accuracy instance $((RUNS_S - (SECONDS - runs_started)))
# The table of both (neither run again): accuracy.md and accuracy.json.
accuracy and,instance 1 --table-only

cp "$runs/accuracy.md" "$runs/accuracy.json" "$out/" 2>/dev/null
finished=0
for method in and instance; do
    run=$runs/project-$method-seed$seed
    [ -f "$run/result.json" ] && finished=$((finished + 1))
    [ -f "$run/summary.json" ] && cp "$run/summary.json" "$out/$method-summary.json"
    tail -n 60 "$run/train.log" >"$out/$method-train.log" 2>/dev/null || rm -f "$out/$method-train.log"
done
log "result: $finished of 2 runs finished in $((SECONDS - started)) s ($RUNS_S s for the runs); table in accuracy.md"
[ "$finished" = 2 ]

#!/usr/bin/env bash
# A GPU session's first command: what matters on a GPU, most important first, in at most TOTAL_S of
# step budgets (a device command may run 600 s; this leaves room for the start and for a rerun).
# Run from anywhere in the checkout:
#
#   bash bench/gpu_check.sh [OUT_DIR]               # on the GPU machine; OUT_DIR: $OUT, else ./gpu-check
#   bash bench/gpu_check.sh --rehearse [OUT_DIR]    # the same steps, logic and files on CPU at toy sizes
#
#   (0) gpu      torch sees a GPU; if not: one line on stderr, exit 2, nothing else runs
#       setup    wheels from .whl/ (bench/gpu_wheels.sh) into /tmp/site, then zarr and faiss import
#   (1) rebuild  nbr-index bench at ImageNet scale (N = 1,281,167), 2 repeats: the fused pass (c)
#                against the full blocked matmul (e); target (c)/(e) <= REBUILD_TARGET
#   (2) cuda-tests  tests/test_nbr_cuda.py tests/test_trainer_cuda.py: a skipped test fails the step
#   (3) speed-bf16  trainer speed, ResNet18 bf16 under the run's determinism: AND >= SPEED_TARGET x
#                supervised; then speed-bf16-compiled (--compile) only if COMPILED_MIN_S are left
#
# OUT_DIR gets summary.txt (each step's status and time as it ends, then the targets with PASS or
# FAIL) and one log per step: 7 files, within the 8 a device command returns. Exit status: 0 when
# every step ran and passed, 1 when one failed or ran out of time, 2 when no GPU is visible. A
# target missed is a FAIL line in the summary, not an exit status: it is a measurement.
# Python: $PYTHON, else python3 (the GPU machine's holds torch; zarr and faiss come as wheels).
# GPU_CHECK_TESTS (space-separated files or node ids) replaces step (2)'s tests.
set -u

# Step budgets (s) on the GPU. The fixed ones plus COMPILED_MIN_S add up to at most TOTAL_S <= 360
# (tests/test_gpu_check.py parses these lines); the compiled speed step gets whatever is left.
TOTAL_S=360
GPU_S=25            # (0) python imports torch (a cold disk on a fresh machine) and reads the device
SETUP_S=20          # pip installs ~28 MiB of wheels, without bytecode compilation
REBUILD_S=135       # (1) ~90 s expected: 2 x (Triton pass, torch-ops pass, half and full matmul) + warm-up
TESTS_S=90          # (2) ~20 tests, two of them short training runs (one compiled)
SPEED_S=30          # (3) 2 x 63 ResNet18 steps of batch 256 plus start-up
COMPILED_MIN_S=60   # (3') torch.compile of both networks, then the same steps
REBUILD_TARGET=1.6  # (c) / (e) at most
SPEED_TARGET=0.85   # AND / supervised at least

mode=gpu
if [ "${1:-}" = "--rehearse" ]; then
    mode=rehearse
    shift
fi
PY=${PYTHON:-python3}
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$mode" = gpu ]; then
    device=cuda
    rebuild_args=(--n 1281167 --device cuda --no-reference --repeat 2)
    tests=(tests/test_nbr_cuda.py tests/test_trainer_cuda.py)
    speed_args=(--arch resnet18 --size 32 --batch-size 256 --n 50000 --device cuda --precision bf16)
else
    # Toy sizes on CPU: the same steps and summary, budgets for a loaded 2-core machine. A CPU
    # torch.compile of both networks takes minutes (150 s on 2 cores), more than the whole
    # rehearsal's budget: the rehearsal shows the compiled step's skip.
    device=cpu
    TOTAL_S=330 GPU_S=60 SETUP_S=60 REBUILD_S=60 TESTS_S=90 SPEED_S=60 COMPILED_MIN_S=331
    rebuild_args=(--n 4096 --device cpu --no-reference --repeat 2)
    tests=(tests/test_precision.py)
    speed_args=(--arch smallcnn --size 8 --batch-size 8 --n 256 --steps 1 --device cpu --precision bf16)
fi
# GPU_CHECK_TESTS: other test files or node ids for step (2), space-separated (a rerun of a few).
[ -n "${GPU_CHECK_TESTS:-}" ] && read -r -a tests <<<"$GPU_CHECK_TESTS"

started=$SECONDS
failed=()      # names of the steps that failed
targets=()     # the summary's target lines
say() { echo "$*" | tee -a "$out/summary.txt"; }
: >"$out/summary.txt"

# step NAME BUDGET_S COMMAND...: run COMMAND under its budget, output to OUT_DIR/NAME.log; sets
# step_rc (124 or 137: out of time) and step_s.
step() {
    local name=$1 budget=$2
    shift 2
    local start=$SECONDS
    timeout -k 5 "$budget" "$@" >"$out/$name.log" 2>&1
    step_rc=$?
    step_s=$((SECONDS - start))
}

# report NAME BUDGET_S OK DETAIL: the step's summary line; a step not OK is counted as failed.
report() {
    local name=$1 budget=$2 ok=$3 detail=$4 status=ok
    if [ "$step_rc" = 124 ] || [ "$step_rc" = 137 ]; then
        status="OUT OF TIME"
    elif [ "$ok" != 1 ]; then
        status="FAIL (exit $step_rc)"
    fi
    [ "$status" = ok ] || failed+=("$name")
    say "step $name: $status in $step_s s (budget $budget s)${detail:+: $detail}"
}

# target LABEL VALUE OP LIMIT: one PASS / FAIL line for a measured ratio (VALUE empty: not measured).
target() {
    local label=$1 value=$2 op=$3 limit=$4
    if [ -z "$value" ]; then
        targets+=("  $label: not measured")
    elif awk -v v="$value" -v l="$limit" -v op="$op" 'BEGIN { exit !(op == "<=" ? v <= l : v >= l) }'; then
        targets+=("  $label: $value $op $limit: PASS")
    else
        targets+=("  $label: $value $op $limit: FAIL")
    fi
}

# (0) A GPU, or one line and exit 2 before anything else runs.
probe='import sys, torch
if sys.argv[1] == "cpu":
    print(f"torch {torch.__version__} on cpu, {torch.get_num_threads()} threads (rehearsal: no GPU looked for)")
    sys.exit(0)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): torch.cuda.is_available() is False")
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {p.name}, {p.total_memory / 2**30:.1f} GiB, "
      f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")'
step gpu "$GPU_S" "$PY" -c "$probe" "$device"
if [ "$step_rc" != 0 ]; then
    seen=$(tail -n 1 "$out/gpu.log")
    echo "error: no CUDA GPU visible (${seen:-python gave no answer in $GPU_S s}): run this on the GPU machine, or run" \
         "bash bench/gpu_check.sh --rehearse on CPU" | tee -a "$out/summary.txt" >&2
    exit 2
fi
if [ "$mode" = gpu ]; then
    say "gpu-check on the GPU: step budgets $TOTAL_S s; targets (c)/(e) <= $REBUILD_TARGET, AND / supervised >= $SPEED_TARGET"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$out/gpu.log" 2>&1
else
    say "gpu-check rehearsal on CPU at toy sizes (the numbers prove the script, not the targets): step budgets" \
        "$TOTAL_S s; targets (c)/(e) <= $REBUILD_TARGET, AND / supervised >= $SPEED_TARGET"
fi
say "gpu: $(head -n 1 "$out/gpu.log")"

# Packages the GPU machine lacks come as wheels (not in a rehearsal: this python has them).
setup='set -e
if [ "$1" = gpu ] && compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
    "$2" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
else
    echo "no wheels installed ($1 mode, $(compgen -G ".whl/*.whl" | wc -l) in .whl/): the packages of $2"
fi
PYTHONPATH="$PYTHONPATH:/tmp/site" "$2" -c "import zarr, faiss; print(\"zarr\", zarr.__version__, \"faiss\", faiss.__version__)"'
step setup "$SETUP_S" bash -c "$setup" setup "$mode" "$PY"
[ -d /tmp/site ] && [ "$mode" = gpu ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
report setup "$SETUP_S" "$([ "$step_rc" = 0 ] && echo 1)" "$(tail -n 1 "$out/setup.log")"

# (1) The rebuild at ImageNet scale: its ratios line holds fused_over_full_matmul, (c)/(e).
step rebuild "$REBUILD_S" "$PY" -m nbr_index.cli bench "${rebuild_args[@]}"
ratio=$(grep -oE 'fused_over_full_matmul [0-9.]+' "$out/rebuild.log" | tail -n 1 | cut -d' ' -f2)
report rebuild "$REBUILD_S" "$([ "$step_rc" = 0 ] && [ -n "$ratio" ] && echo 1)" \
    "$([ -n "$ratio" ] && echo "(c)/(e) = $ratio" || echo "no fused_over_full_matmul in rebuild.log")"
grep -E "^ +(\((c|c'|e)\)|ratios:|ratio |check|triton tile kernel)" "$out/rebuild.log" | sed 's/^ */    /' | tee -a "$out/summary.txt"
target "rebuild: the fused pass (c) over the full blocked matmul (e)" "$ratio" "<=" "$REBUILD_TARGET"

# (2) The CUDA tests. Every test must run: skipped ones (no GPU seen, a package missing) fail the step.
step cuda-tests "$TESTS_S" "$PY" -m pytest -v -rs -p no:cacheprovider "${tests[@]}"
count() { grep -cE "^tests/.*::.* $1" "$out/cuda-tests.log"; }   # per-test lines: counted also when cut short
passed=$(count PASSED) skipped=$(count SKIPPED) failures=$(( $(count FAILED) + $(count ERROR) ))
tests_ok=$([ "$step_rc" = 0 ] && [ "$passed" -gt 0 ] && [ "$skipped" = 0 ] && echo 1)
detail="$passed passed, $failures failed, $skipped skipped"
[ "$passed" = 0 ] && detail="$detail: no test ran"
[ "$skipped" != 0 ] && detail="$detail: every test must run here ($(grep -m 1 -E "^SKIPPED" "$out/cuda-tests.log"))"
report cuda-tests "$TESTS_S" "$tests_ok" "$detail"

# (3) AND against supervised steps, under the determinism trainer run uses (its default).
speed_ratio() { grep -oE 'AND / supervised = [0-9.]+' "$out/$1.log" | tail -n 1 | cut -d' ' -f5; }
step speed-bf16 "$SPEED_S" "$PY" -m trainer.cli speed "${speed_args[@]}"
ratio=$(speed_ratio speed-bf16)
report speed-bf16 "$SPEED_S" "$([ "$step_rc" = 0 ] && [ -n "$ratio" ] && echo 1)" "$(tail -n 1 "$out/speed-bf16.log")"
target "AND / supervised, ${speed_args[1]} bf16" "$ratio" ">=" "$SPEED_TARGET"

left=$((TOTAL_S - (SECONDS - started)))
if [ "$left" -ge "$COMPILED_MIN_S" ]; then
    step speed-bf16-compiled "$left" "$PY" -m trainer.cli speed "${speed_args[@]}" --compile
    ratio=$(speed_ratio speed-bf16-compiled)
    report speed-bf16-compiled "$left" "$([ "$step_rc" = 0 ] && [ -n "$ratio" ] && echo 1)" \
        "$(tail -n 1 "$out/speed-bf16-compiled.log")"
else
    ratio=
    echo "skipped: $left s of the $TOTAL_S s left, under the $COMPILED_MIN_S s it needs" >"$out/speed-bf16-compiled.log"
    say "step speed-bf16-compiled: skipped: $left s of the $TOTAL_S s left, under the $COMPILED_MIN_S s it needs"
fi
target "AND / supervised, ${speed_args[1]} bf16 compiled" "$ratio" ">=" "$SPEED_TARGET"

say "targets:"
for line in "${targets[@]}"; do say "$line"; done
met=$(printf '%s\n' "${targets[@]}" | grep -c ': PASS$')
missed=$(printf '%s\n' "${targets[@]}" | grep -c ': FAIL$')
verdict="all steps ok"
[ ${#failed[@]} -gt 0 ] && verdict="${#failed[@]} step(s) failed: ${failed[*]}"
say "result: $verdict; targets $met PASS, $missed FAIL; $((SECONDS - started)) s of $TOTAL_S s; logs in $out"
[ ${#failed[@]} -eq 0 ]

#!/usr/bin/env bash
# End-to-end test of `docker compose up` with a real Docker engine (tests/test_docker_e2e.py runs it).
#
#   bash docker/e2e.sh                  # everything below; exit 0 when every check passed
#   bash docker/e2e.sh --start-engine   # only make sure an engine answers (.ci/run, before pytest)
#
# 1. Engine: uses the one that answers; else, as root, installs Debian's docker.io, docker-compose
#    and debootstrap where missing and starts dockerd in the background.
# 2. Base image: $E2E_BASE_IMAGE if present, else made with debootstrap (no registry needed).
# 3. Builds the image with compose, on that base, torch from $E2E_TORCH_INDEX_URL.
# 4. Cases, each its own compose project (its own volumes), removed afterwards:
#    default     the bundled default job with a plain `up`: both services exit 0, rounds 1..R
#                published and verified (`nbr-index inspect --verify` in a container on the
#                volume), the trainer's summary.json written, every round published once.
#    rerun       `up` again on the same volumes (run directory refused), then with the run
#                volume removed (store refused): as for bad input below, and the store unchanged.
#    kill        nbr-index killed (`docker kill`) after publishing round 1, started again: the job
#                completes, each round published once, round 1 untouched.
#    bad-dataset, missing-data   the trainer exits 2 at once with its one-line error, is not
#                restarted, writes nothing to the store; nbr-index is not started; `up` exits
#                non-zero.
#
# Environment: E2E_BASE_IMAGE [and-nbr-base:bookworm], E2E_TORCH_INDEX_URL [https://pypi.org/simple:
# build machines here reach PyPI only; the Dockerfile's default is PyTorch's CPU index],
# E2E_WORK [a new temporary directory: logs, rootfs], E2E_CASES [all: default rerun kill
# bad-dataset missing-data], E2E_EPOCHS [3: epochs per round of the cases other than default],
# E2E_UP_LIMIT_S [900: each `compose up` must return within this; the default job takes 3-6
# minutes on 2 loaded cores, so a hang fails the test long before CI's 30 minutes].
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${E2E_BASE_IMAGE:-and-nbr-base:bookworm}
TORCH_INDEX_URL=${E2E_TORCH_INDEX_URL:-https://pypi.org/simple}
CASES=${E2E_CASES:-default rerun kill bad-dataset missing-data}
EPOCHS=${E2E_EPOCHS:-3}
UP_LIMIT_S=${E2E_UP_LIMIT_S:-900}
ROUNDS=4
WORK=${E2E_WORK:-$(mktemp -d /tmp/and-e2e.XXXXXX)}
mkdir -p "$WORK"
PROJECT_PREFIX=and-e2e
# The compose settings of the calling shell would change the bundled default job.
for variable in ${!AND_@}; do unset "$variable"; done

say() { echo "e2e: $*" >&2; }
fail() { say "FAIL: $*"; exit 1; }
now() { date +%s; }
seconds_since() { echo $(($(now) - $1)); }

# --------------------------------------------------------------------------------------- engine
engine_answers() { docker info > /dev/null 2>&1; }

apt_install() {  # apt_install PACKAGE...: Debian packages, as root
    [ "$(id -u)" = 0 ] || fail "$* needed: install them, or run as root"
    say "installing $* (apt-get)"
    apt-get update -qq > "$WORK/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >> "$WORK/apt.log" 2>&1 \
        || fail "apt-get install $* failed: see $WORK/apt.log"
}

start_engine() {
    engine_answers && return 0
    [ "$(id -u)" = 0 ] || fail "no Docker engine answers and this is not root: start dockerd, or run as root"
    local missing=()
    command -v dockerd > /dev/null || missing+=(docker.io)
    command -v docker-compose > /dev/null || docker compose version > /dev/null 2>&1 || missing+=(docker-compose)
    command -v debootstrap > /dev/null || missing+=(debootstrap)
    [ ${#missing[@]} = 0 ] || apt_install "${missing[@]}"
    # Niced: the containers inherit it, so the job yields to other work on a shared machine.
    nohup nice -n 15 dockerd > "$WORK/dockerd.log" 2>&1 &
    local pid=$!
    for _ in $(seq 120); do
        engine_answers && { say "started dockerd (pid $pid, log $WORK/dockerd.log)"; echo "$pid" > "$WORK/dockerd.pid"; return 0; }
        kill -0 "$pid" 2> /dev/null || fail "dockerd exited: see $WORK/dockerd.log"
        sleep 0.5
    done
    fail "dockerd did not answer within 60 s: see $WORK/dockerd.log"
}

# Compose v2 (`docker compose`) where present, else docker-compose 1.29.
if docker compose version > /dev/null 2>&1; then
    COMPOSE=(docker compose)
    COMPOSE_V2=1
else
    COMPOSE=(docker-compose)
    COMPOSE_V2=0
fi
compose() { local project=$1; shift; "${COMPOSE[@]}" -p "$PROJECT_PREFIX-$project" "$@"; }

# ----------------------------------------------------------------------------------- base image
ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
        say "base image $BASE_IMAGE: present"
        return
    fi
    command -v debootstrap > /dev/null || apt_install debootstrap
    say "base image $BASE_IMAGE: debootstrap bookworm (a few minutes)"
    local rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" > "$WORK/debootstrap.log" 2>&1 || fail "debootstrap failed: see $WORK/debootstrap.log"
    # This machine's certificates: pip inside the build verifies the package index with them.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" > /dev/null
    rm -rf "$rootfs"
}

# -------------------------------------------------------------------------------------- helpers
container_of() {  # container_of PROJECT SERVICE: the id of the service's container
    docker ps -a -q --filter "label=com.docker.compose.project=$PROJECT_PREFIX-$1" \
        --filter "label=com.docker.compose.service=$2" | head -n 1
}
exit_code_of() { docker inspect -f '{{.State.ExitCode}}' "$(container_of "$1" "$2")"; }
started_at() {  # started_at PROJECT SERVICE: when the service's container last started ("none": no container)
    local id
    id=$(container_of "$1" "$2")
    if [ -n "$id" ]; then docker inspect -f '{{.State.StartedAt}}' "$id"; else echo none; fi
}

# in_volume PROJECT SERVICE CMD...: run CMD in a one-off container of SERVICE on the project's volumes.
in_volume() {
    local project=$1 service=$2; shift 2
    compose "$project" run --rm --no-deps -T "$service" "$@" 2>> "$WORK/in-volume.log"
}

store_json() {  # store_json PROJECT DATASET: `nbr-index inspect --verify --json` of the store
    in_volume "$1" nbr-index nbr-index inspect --store "/store/$2" --verify --json
}

# up PROJECT LOG [ENV...]: a plain `compose up`, attached, with a time limit; prints its exit status.
up() {
    local project=$1 log=$2; shift 2
    local status=0
    env "$@" timeout "$UP_LIMIT_S" "${COMPOSE[@]}" -p "$PROJECT_PREFIX-$project" up --no-color > "$log" 2>&1 || status=$?
    [ "$status" != 124 ] || fail "$project: compose up did not return within $UP_LIMIT_S s: see $log"
    echo "$status"
}

clean() { compose "$1" down -v --remove-orphans > /dev/null 2>&1 || true; }

check_store() {  # check_store JSON: features 0..R and neighbourhoods 1..R complete and verified
    python3 - "$1" "$ROUNDS" <<'EOF'
import json, sys
d, rounds = json.loads(sys.argv[1]), int(sys.argv[2])
complete = {kind: [e["round"] for e in d[kind] if e["complete"]] for kind in ("features", "neighbourhoods")}
problems = []
if complete["features"] != list(range(rounds + 1)):
    problems.append(f"complete feature rounds {complete['features']}, expected 0..{rounds}")
if complete["neighbourhoods"] != list(range(1, rounds + 1)):
    problems.append(f"published neighbourhood rounds {complete['neighbourhoods']}, expected 1..{rounds}")
if d["leftovers"]:
    problems.append(f"leftovers {d['leftovers']}")
if not d["verify"]["ok"]:
    problems.append(f"verify: {d['verify']['problems']}")
sys.exit("; ".join(problems) or None)
EOF
}

check_summary() {  # check_summary PROJECT MIN_KNN: summary.json has rounds 0..R and a final kNN >= MIN_KNN
    in_volume "$1" trainer python3 - "$ROUNDS" "$2" <<'EOF'
import json, sys
rounds, min_knn = int(sys.argv[1]), float(sys.argv[2])
summary = json.load(open("/runs/digits/summary.json"))
assert [row["round"] for row in summary["rounds"]] == list(range(rounds + 1)), summary["rounds"]
assert summary["config"]["index"] == "service", summary["config"]["index"]
assert summary["final_knn_top1"] >= min_knn, f"final kNN top-1 {summary['final_knn_top1']} < {min_knn}"
print(f"final kNN top-1 {summary['final_knn_top1']:.2f}%, per round",
      [row["knn_top1"] for row in summary["rounds"]])
EOF
}

published_once() {  # published_once LOG FIRST LAST: "round r published:" exactly once for r in FIRST..LAST
    local r count
    for r in $(seq "$2" "$3"); do
        count=$(grep -c "round $r published:" "$1" || true)
        [ "$count" = 1 ] || fail "round $r published $count times (expected once): see $1"
    done
}

# ------------------------------------------------------------------------------------------ cases
case_default() {
    clean default
    local log="$WORK/default.log" started status
    started=$(now)
    status=$(up default "$log")
    say "default: compose up returned $status after $(seconds_since "$started") s"
    [ "$status" = 0 ] || fail "default: compose up exited $status: see $log"
    [ "$(exit_code_of default trainer)" = 0 ] || fail "default: trainer exited $(exit_code_of default trainer): see $log"
    [ "$(exit_code_of default nbr-index)" = 0 ] || fail "default: nbr-index exited $(exit_code_of default nbr-index): see $log"
    check_store "$(store_json default digits)" || fail "default: store check failed"
    docker logs "$(container_of default nbr-index)" > "$WORK/default-nbr-index.log" 2>&1
    published_once "$WORK/default-nbr-index.log" 1 "$ROUNDS"
    # The README's table has 89.2-93.6% for this job at W = 2 over six seeds; chance is 10%.
    local summary
    summary=$(check_summary default 85) || fail "default: summary.json check failed"
    say "default: $summary"
}

# expect_refusal CASE LOG STATUS MESSAGE NBR_STARTED: the trainer's one-line error, exit 2, no
# restart, nbr-index not started (NBR_STARTED: its started_at before the `up`).
expect_refusal() {
    local name=$1 log=$2 status=$3 message=$4 nbr_started=$5 trainer
    trainer=$(container_of "$name" trainer)
    [ "$(docker inspect -f '{{.State.ExitCode}}' "$trainer")" = 2 ] || fail "$name: trainer did not exit 2: see $log"
    [ "$(docker inspect -f '{{.RestartCount}}' "$trainer")" = 0 ] || fail "$name: the trainer was restarted"
    docker logs "$trainer" > "$WORK/$name-trainer.log" 2>&1
    tail -n 1 "$WORK/$name-trainer.log" | grep -qF "error: $message" \
        || fail "$name: the trainer's last line is not 'error: $message...': see $WORK/$name-trainer.log"
    ! grep -q Traceback "$WORK/$name-trainer.log" || fail "$name: a traceback in $WORK/$name-trainer.log"
    # nbr-index waits for the trainer to be healthy, which it never is: compose reports the
    # dependency as failed and exits non-zero, and nbr-index is never started. docker-compose 1.29
    # cannot promise that: its health wait counts only running containers, so a trainer that has
    # exited before compose's first poll reads as healthy, nbr-index starts (and finds nothing to
    # do) and `up` may return 0 (seen once in 2026-12-02's CI). There the refusal is what the
    # trainer did (above), and the callers' check that the store did not change.
    if [ "$COMPOSE_V2" = 1 ]; then
        [ "$status" != 0 ] || fail "$name: compose up exited 0: see $log"
        case $(started_at "$name" nbr-index) in
            "$nbr_started" | none | 0001-01-01T00:00:00Z) ;;
            *) fail "$name: nbr-index was started" ;;
        esac
    fi
    # Compose v2 streams the trainer's output as it runs; docker-compose 1.29 attaches to the
    # services only once all are started, so there the error is in `docker-compose logs trainer`.
    if [ "$COMPOSE_V2" = 1 ]; then grep -qF "error: $message" "$log" || fail "$name: the error is not in $log"; fi
}

case_rerun() {
    local log="$WORK/rerun.log" before status nbr_started
    [ -n "$(container_of default trainer)" ] || fail "rerun needs the default case's volumes: E2E_CASES='default rerun'"
    before=$(store_json default digits)
    nbr_started=$(started_at default nbr-index)
    status=$(up default "$log")
    say "rerun on the same volumes: compose up returned $status"
    expect_refusal default "$log" "$status" "/runs/digits already holds a run" "$nbr_started"
    [ "$(store_json default digits)" = "$before" ] || fail "rerun: the store changed"

    # The same store with a fresh run directory: the store refuses.
    compose default down > /dev/null 2>&1
    docker volume rm "$PROJECT_PREFIX-default_runs" > /dev/null
    log="$WORK/rerun-store.log"
    nbr_started=$(started_at default nbr-index)
    status=$(up default "$log")
    say "rerun with a fresh run volume: compose up returned $status"
    expect_refusal default "$log" "$status" "store /store/digits already holds rounds of another run" "$nbr_started"
    [ "$(store_json default digits)" = "$before" ] || fail "rerun: the store changed"
    clean default
}

case_kill() {
    clean kill
    local log="$WORK/kill.log" nbr_log="$WORK/kill-nbr-index.log" up_pid nbr round_one started
    started=$(now)
    env AND_EPOCHS_PER_ROUND="$EPOCHS" timeout "$UP_LIMIT_S" "${COMPOSE[@]}" -p "$PROJECT_PREFIX-kill" up --no-color > "$log" 2>&1 &
    up_pid=$!
    for _ in $(seq 600); do
        nbr=$(container_of kill nbr-index)
        [ -n "$nbr" ] && docker logs "$nbr" 2>&1 | grep -q "round 1 published:" && break
        sleep 0.5
    done
    docker logs "$nbr" 2>&1 | grep -q "round 1 published:" || fail "kill: round 1 was not published within 5 minutes: see $log"
    docker kill "$nbr" > /dev/null
    [ "$(docker inspect -f '{{.State.ExitCode}}' "$nbr")" = 137 ] || fail "kill: nbr-index was not killed"
    say "kill: nbr-index killed after publishing round 1"
    round_one=$(in_volume kill nbr-index python3 -c "
from storage import Store; print(Store.open('/store/digits').read_neighbourhoods(1).attrs)")
    sleep 3
    docker start "$nbr" > /dev/null
    for _ in $(seq 120); do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$nbr")" = healthy ] && break
        sleep 0.5
    done
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$nbr")" = healthy ] || fail "kill: restarted nbr-index not healthy within 60 s"
    say "kill: nbr-index started again and healthy"
    local status=0
    wait "$up_pid" || status=$?
    say "kill: compose up returned $status after $(seconds_since "$started") s"
    [ "$status" = 0 ] || fail "kill: compose up exited $status: see $log"
    [ "$(exit_code_of kill trainer)" = 0 ] || fail "kill: trainer exited $(exit_code_of kill trainer): see $log"
    [ "$(exit_code_of kill nbr-index)" = 0 ] || fail "kill: restarted nbr-index exited $(exit_code_of kill nbr-index)"
    check_store "$(store_json kill digits)" || fail "kill: store check failed"
    check_summary kill 0 > /dev/null || fail "kill: summary.json check failed"
    docker logs "$nbr" > "$nbr_log" 2>&1  # both lives of the container
    published_once "$nbr_log" 1 "$ROUNDS"
    [ "$(grep -c "serving /store/digits" "$nbr_log")" = 2 ] || fail "kill: expected two serve starts in $nbr_log"
    [ "$(in_volume kill nbr-index python3 -c "
from storage import Store; print(Store.open('/store/digits').read_neighbourhoods(1).attrs)")" = "$round_one" ] \
        || fail "kill: round 1 changed after the restart"
    clean kill
}

case_bad_input() {  # case_bad_input NAME MESSAGE ENV...: the trainer refuses; nothing in the store
    local name=$1 message=$2; shift 2
    clean "$name"
    local log="$WORK/$name.log" started status
    started=$(now)
    status=$(up "$name" "$log" "$@")
    say "$name: compose up returned $status after $(seconds_since "$started") s"
    expect_refusal "$name" "$log" "$status" "$message" none
    in_volume "$name" trainer sh -c '[ -z "$(ls -A /store)" ]' || fail "$name: something was written to the store volume"
    clean "$name"
}

# ------------------------------------------------------------------------------------------- main
start_engine
[ "${1:-}" = --start-engine ] && exit 0

say "compose: $("${COMPOSE[@]}" version 2>/dev/null | head -n 1); logs in $WORK"
ensure_base_image
started=$(now)
compose default build --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
    > "$WORK/build.log" 2>&1 || fail "build failed: see $WORK/build.log"
say "build: $(seconds_since "$started") s; image and-nbr:cpu $(docker image inspect -f '{{.Size}}' and-nbr:cpu | awk '{printf "%.2f GB", $1 / 1e9}')"

for case in $CASES; do
    started=$(now)
    case $case in
        default) case_default ;;
        rerun) case_rerun ;;
        kill) case_kill ;;
        bad-dataset) case_bad_input bad-dataset "unknown dataset 'nosuch'" AND_DATASET=nosuch ;;
        missing-data) case_bad_input missing-data "--data-root /data has no train/ folder" \
            AND_DATASET=imagefolder AND_DATA_DIR="$WORK/no-such-folder" AND_EPOCHS_PER_ROUND="$EPOCHS" ;;
        *) fail "unknown case $case" ;;
    esac
    say "$case: passed in $(seconds_since "$started") s"
done
clean default
say "all cases passed: $CASES"

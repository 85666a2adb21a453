"""One writer per store and per run dir (issue 32, point 1): the writer lease and the run dir's lock,
staging names of their own per writer, and the write checks before training.

Real parts throughout: the lease on real directories and on fsspec's memory filesystem, racing
processes, real `trainer run` and `nbr-index rebuild` processes, a read-only tmpfs mount."""
from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from storage import LeaseHeld, LeaseLost, Store, StoreError, check_store_writable, read_writer_lease, take_writer_lease
from storage.lease import STALE_AFTER_S
from tests.helpers import unit_rows, wait_for

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
N, DIM, CHUNK = 300, 8, 64
CURRICULUM = {"rounds": 2, "k": 1, "tau": 0.1, "mode": "progressive"}
# A short digits run: round 0 (instance) and round 1 (AND), two epochs each.
SHORT = ["--rounds", "1", "--epochs-per-round", "2"]


def _trainer(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "run", *args]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_trainer(*args), env=ENV, capture_output=True, text=True, timeout=timeout)


def _one_error_line(result: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit 2 and exactly one line on stderr, ``error: ...`` holding every one of ``parts``."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for part in parts:
        assert part in lines[0], lines[0]
    assert "epoch" not in result.stdout        # refused before any training
    return lines[0]


def _lease_json(owner: str, run_dir: str, host: str, pid: int, heartbeat: float) -> str:
    return json.dumps({"format": "and-nbr-writer-lease", "version": 1, "owner": owner, "run_dir": run_dir,
                       "host": host, "pid": pid, "started": heartbeat, "heartbeat": heartbeat})


def _write_lease(store_dir: Path, **fields) -> None:
    store_dir.mkdir(parents=True, exist_ok=True)
    (store_dir / "writer-lease.json").write_text(_lease_json(**fields))


def _dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _stop_outside_the_lease_lock(proc: subprocess.Popen, store_dir: Path) -> None:
    """SIGSTOP ``proc`` at a moment it does not hold the lease's flock (it holds it for a
    heartbeat's few milliseconds every 20 s), so that another taker is answered, not kept waiting."""
    lock = store_dir / ".writer-lease.lock"
    while True:
        proc.send_signal(signal.SIGSTOP)
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return                      # closing the fd below releases it again
        except BlockingIOError:
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- the lease, through storage

@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_second_owner_is_refused_naming_the_first_until_it_releases(tmp_path, memory_store_url, where):
    url = str(tmp_path / "store") if where == "local" else memory_store_url
    first = take_writer_lease(url, str(tmp_path / "ra"), "run-a")
    held = read_writer_lease(url)
    assert (held.owner, held.run_dir, held.host, held.pid) == ("run-a", str(tmp_path / "ra"),
                                                                socket.gethostname(), os.getpid())
    with pytest.raises(LeaseHeld) as refused:
        take_writer_lease(url, str(tmp_path / "rb"), "run-b")
    message = str(refused.value)
    assert "\n" not in message
    assert f"run dir {tmp_path / 'ra'} (host {socket.gethostname()}, pid {os.getpid()}, last heartbeat" in message
    assert "taken over" in message and "another --store" in message
    assert read_writer_lease(url) == held                     # the refused taker changed nothing

    first.release()
    assert read_writer_lease(url) is None
    second = take_writer_lease(url, str(tmp_path / "rb"), "run-b")
    assert read_writer_lease(url).owner == "run-b"
    second.release()


def test_stale_dead_or_own_leases_are_taken_over_live_ones_are_not(tmp_path):
    store_dir = tmp_path / "store"
    url, now = str(store_dir), time.time()
    takeable = {
        "no heartbeat for longer than the limit": dict(host="elsewhere", pid=1, heartbeat=now - STALE_AFTER_S - 5),
        "a process of this host that has ended": dict(host=socket.gethostname(), pid=_dead_pid(), heartbeat=now),
    }
    for why, fields in takeable.items():
        _write_lease(store_dir, owner="dead-run", run_dir="/runs/dead", **fields)
        lease = take_writer_lease(url, str(tmp_path / "run"), "new-run")
        assert read_writer_lease(url).owner == "new-run", why
        lease.release()

    live = {
        "a fresh heartbeat from another host": dict(host="elsewhere", pid=1, heartbeat=now),
        "a live process of this host": dict(host=socket.gethostname(), pid=os.getpid(), heartbeat=now - 30),
    }
    for why, fields in live.items():
        _write_lease(store_dir, owner="live-run", run_dir="/runs/live", **fields)
        before = (store_dir / "writer-lease.json").read_bytes()
        with pytest.raises(LeaseHeld, match="run dir /runs/live"):
            take_writer_lease(url, str(tmp_path / "run"), "new-run")
        assert (store_dir / "writer-lease.json").read_bytes() == before, why

    # The same run (an elastic restart of its workers) takes its own lease back at once.
    lease = take_writer_lease(url, "/runs/live", "live-run")
    assert read_writer_lease(url).pid == os.getpid()
    lease.release()

    (store_dir / "writer-lease.json").write_text("{not json")
    with pytest.raises(LeaseHeld, match="cannot be read: if no training run uses store"):
        take_writer_lease(url, str(tmp_path / "run"), "new-run")


def _race_for_the_lease(url: str, index: int, start, queue) -> None:
    start.wait()
    try:
        take_writer_lease(url, f"/runs/{index}", f"run-{index}")   # kept: the process ends holding it
        queue.put(index)
    except LeaseHeld:
        queue.put(None)


def test_of_processes_racing_for_a_lease_exactly_one_takes_it(tmp_path):
    url, racers = str(tmp_path / "store"), 4
    ctx = mp.get_context("spawn")
    start, queue = ctx.Barrier(racers), ctx.Queue()
    procs = [ctx.Process(target=_race_for_the_lease, args=(url, i, start, queue)) for i in range(racers)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, results
    assert read_writer_lease(url).owner == f"run-{winners[0]}"


def test_the_heartbeat_advances_and_a_lost_lease_stops_the_stores_writes(tmp_path):
    url = str(tmp_path / "store")
    lease = take_writer_lease(url, str(tmp_path / "run"), "run-a", heartbeat_s=0.05)
    first_beat = read_writer_lease(url).heartbeat
    wait_for(lambda: read_writer_lease(url).heartbeat > first_beat, timeout=10, what="a heartbeat")

    store = Store.create_or_open(url, N, DIM, "toy-lease", CURRICULUM, chunk_rows=CHUNK).write_as("run-a", lease)
    store.write_features(0, unit_rows(N, DIM, seed=0))
    # Another run took the store over (this one looked dead: paused past the limit).
    _write_lease(tmp_path / "store", owner="run-b", run_dir="/runs/b", host="elsewhere", pid=1,
                 heartbeat=time.time())
    with pytest.raises(LeaseLost, match="lost the writer lease of store .* to run dir /runs/b"):
        store.write_features(1, unit_rows(N, DIM, seed=1))
    assert store.complete_feature_rounds() == [0]
    assert not any(name.startswith(".staging-") for name in os.listdir(tmp_path / "store" / "features"))
    lease.release()                                            # leaves the other run's lease alone
    assert read_writer_lease(url).owner == "run-b"


# ---------------------------------------------------------------- staging, per writer

def test_a_writer_never_touches_another_writers_staging_and_the_lease_holder_removes_dead_ones(tmp_path):
    url = str(tmp_path / "store")
    Store.create_or_open(url, N, DIM, "toy-staging", CURRICULUM, chunk_rows=CHUNK)
    features = tmp_path / "store" / "features"
    a = Store.open(url).write_as("run-a")
    a.prepare_features(1)
    a.write_feature_chunks(1, unit_rows(N, DIM, seed=1), 0, 1)
    a_files = _files(features / ".staging-round-0001-run-a")

    b = Store.open(url).write_as("run-b")
    b.prepare_features(1)                                      # its own staging, beside a's
    b.write_feature_chunks(1, unit_rows(N, DIM, seed=2), 0, 2)
    b.prepare_features(1)                                      # again: wipes its own only
    assert _files(features / ".staging-round-0001-run-a") == a_files
    assert b.write_feature_chunks(1, unit_rows(N, DIM, seed=2), 1, 2) > 0
    with pytest.raises(StoreError, match="missing chunks 0, 2, 4"):
        b.complete_features(1)                                 # its first writes were wiped

    # Readers never take a staging name for a round.
    assert b.complete_feature_rounds() == [] and Store.open(url).latest_complete_features() is None
    assert sorted(b.describe()["leftovers"]) == ["features/.staging-round-0001-run-a",
                                                 "features/.staging-round-0001-run-b"]
    # Run b holds the lease (run a is dead): a's staging goes, b's own stays.
    with take_writer_lease(url, str(tmp_path / "rb"), "run-b") as lease:
        b.write_as("run-b", lease)
        assert b.remove_dead_staging() == ["features/.staging-round-0001-run-a"]
        assert sorted(os.listdir(features)) == [".staging-round-0001-run-b", "zarr.json"]
        b.write_feature_chunks(1, unit_rows(N, DIM, seed=2), 0, 2)
        checksum = b.complete_features(1)
    np.testing.assert_array_equal(Store.open(url).feature_reader(1).read_all(), unit_rows(N, DIM, seed=2))
    assert Store.open(url).feature_reader(1).checksum == checksum
    with pytest.raises(StoreError, match="writer id must be"):
        b.write_as("../escape")


# ---------------------------------------------------------------- write permission, up front

def test_a_store_under_a_regular_file_is_refused_and_nothing_is_left(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=f"cannot be written \\({blocker} is a file, not a directory\\)"):
        check_store_writable(str(blocker / "store"))
    assert sorted(os.listdir(tmp_path)) == ["file"]
    result = _run(*SHORT, "--run-dir", str(tmp_path / "run"), "--store", str(blocker / "store"))
    _one_error_line(result, f"store {blocker / 'store'} cannot be written", "use a writable --store")
    result = _run(*SHORT, "--run-dir", str(blocker / "run"))
    _one_error_line(result, f"run dir {blocker / 'run'} cannot be written", "use a writable --run-dir")
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.fixture
def read_only_mount(tmp_path):
    """A small tmpfs at tmp_path/ro, given to the test writable; ``.freeze()`` remounts it read-only.
    Skipped where this process cannot mount (not root, no CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}): the read-only case needs one")

    class Mount:
        path = mount_point

        @staticmethod
        def freeze() -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)

    try:
        yield Mount
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_read_only_store_or_run_dir_is_refused_before_any_epoch(tmp_path, read_only_mount):
    from trainer.data import load_dataset

    store_dir = read_only_mount.path / "store"
    Store.create_or_open(str(store_dir), n=1500, dim=128, dataset_id=load_dataset("digits").dataset_id)
    read_only_mount.freeze()
    before = _files(store_dir)

    result = _run(*SHORT, "--run-dir", str(tmp_path / "run"), "--store", str(store_dir))
    _one_error_line(result, f"store {store_dir} cannot be written", "Read-only file system")
    assert not (tmp_path / "run").exists() and _files(store_dir) == before

    result = _run(*SHORT, "--run-dir", str(read_only_mount.path / "run"), "--store", str(tmp_path / "store"))
    _one_error_line(result, f"run dir {read_only_mount.path / 'run'} cannot be written", "Read-only file system")
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- two trainers, real processes

@pytest.mark.slow
def test_a_second_trainer_on_the_store_is_refused_and_the_first_ends_as_if_alone(tmp_path):
    """The issue's case: two trainers, one store, other seeds and run dirs."""
    alone = _run(*SHORT, "--seed", "0", "--run-dir", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr[-3000:]

    store_dir, ra, rb = tmp_path / "store", tmp_path / "ra", tmp_path / "rb"
    first = subprocess.Popen(_trainer(*SHORT, "--seed", "0", "--store", str(store_dir), "--run-dir", str(ra)),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (store_dir / "writer-lease.json").exists() or first.poll() is not None, timeout=120,
                 what="the first trainer's lease")
        _stop_outside_the_lease_lock(first, store_dir)          # alive, whatever the second's speed
        second = _run(*SHORT, "--seed", "1", "--store", str(store_dir), "--run-dir", str(rb))
    finally:
        first.send_signal(signal.SIGCONT)
    _one_error_line(second, f"store {store_dir} is being written by another training run: run dir {ra} (host "
                            f"{socket.gethostname()}, pid {first.pid}, last heartbeat", "use another --store")
    assert not rb.exists()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]

    a = torch.load(tmp_path / "alone" / "checkpoint.pt", weights_only=True)
    b = torch.load(ra / "checkpoint.pt", weights_only=True)
    assert torch.equal(a["memory"], b["memory"])
    summaries = [json.loads((d / "summary.json").read_text()) for d in (tmp_path / "alone", ra)]
    assert [r["knn_top1"] for r in summaries[0]["rounds"]] == [r["knn_top1"] for r in summaries[1]["rounds"]]
    shared, own = Store.open(str(store_dir)), Store.open(str(tmp_path / "alone" / "store"))
    assert shared.complete_feature_rounds() == [0, 1] and shared.published_rounds() == [1]
    assert [shared.feature_reader(r).checksum for r in (0, 1)] == [own.feature_reader(r).checksum for r in (0, 1)]
    assert shared.verify().ok
    assert read_writer_lease(str(store_dir)) is None           # released at the end


@pytest.mark.slow
def test_a_second_process_in_the_run_dir_is_refused_and_the_first_resumes_after_a_crash(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(_trainer("--rounds", "1", "--epochs-per-round", "4", "--seed", "2", "--run-dir", str(run)),
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run / "checkpoint.pt").exists() or first.poll() is not None, timeout=240,
                 what="the first trainer's first checkpoint")
        _stop_outside_the_lease_lock(first, run / "store")
        before = _files(run)

        same = _run("--run-dir", str(run), "--resume")                  # its store too: the lease refuses
        _one_error_line(same, f"run dir {run} (host {socket.gethostname()}, pid {first.pid}",
                        "wait for it to end (or stop it), then continue with --resume")
        other_store = _run("--run-dir", str(run), "--resume", "--store", str(tmp_path / "other"))
        _one_error_line(other_store, f"run dir {run} is in use by another live process (host "
                                     f"{socket.gethostname()}, pid {first.pid}")
        assert read_writer_lease(str(tmp_path / "other")) is None      # the lease it took was given back
        assert _files(run) == before                                   # checkpoint, features: untouched
    finally:
        first.send_signal(signal.SIGKILL)                              # then the first crashes
        first.wait()

    resumed = _run("--run-dir", str(run), "--resume")                  # at once: its holder's pid is gone
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run} at round" in resumed.stdout
    store = Store.open(str(run / "store"))
    assert store.complete_feature_rounds() == [0, 1] and store.verify().ok
    assert not [p for p in store.describe()["leftovers"] if p.startswith("features/")]
    assert read_writer_lease(str(run / "store")) is None


@pytest.mark.slow
def test_a_real_trainer_takes_a_stale_lease_over_and_is_refused_by_a_live_one(tmp_path):
    store_dir = tmp_path / "store"
    _write_lease(store_dir, owner="live-run", run_dir="/runs/live", host=socket.gethostname(), pid=os.getpid(),
                 heartbeat=time.time())
    before = _files(store_dir)
    refused = _run(*SHORT, "--store", str(store_dir), "--run-dir", str(tmp_path / "run"))
    _one_error_line(refused, f"run dir /runs/live (host {socket.gethostname()}, pid {os.getpid()}")
    assert _files(store_dir) == before and not (tmp_path / "run").exists()

    _write_lease(store_dir, owner="dead-run", run_dir="/runs/dead", host="elsewhere", pid=1,
                 heartbeat=time.time() - STALE_AFTER_S - 5)
    taken = _run(*SHORT, "--store", str(store_dir), "--run-dir", str(tmp_path / "run"))
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert Store.open(str(store_dir)).complete_feature_rounds() == [0, 1]
    assert read_writer_lease(str(store_dir)) is None


def test_nbr_index_rebuild_publishes_beside_a_live_training_lease(tmp_path):
    """serve and rebuild share the store with its trainer without the lease (serve beside a live
    trainer: tests/test_trainer.py::test_service_mode_with_nbr_index_serve_matches_the_inline_run)."""
    url = str(tmp_path / "store")
    with take_writer_lease(url, str(tmp_path / "run"), "trainer-run") as lease:
        store = Store.create_or_open(url, N, DIM, "toy-serve", CURRICULUM, chunk_rows=CHUNK).write_as("trainer-run",
                                                                                                       lease)
        store.write_features(0, unit_rows(N, DIM, seed=0))
        rebuilt = subprocess.run([sys.executable, "-m", "nbr_index", "rebuild", "--store", url, "--round", "1"],
                                 env=ENV, capture_output=True, text=True, timeout=300)
        assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
        assert store.published_rounds() == [1]
        lease.check()                                          # still the trainer's
        assert read_writer_lease(url).owner == "trainer-run"

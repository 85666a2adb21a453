"""Provenance (issue 32): a run trains only on rounds computed from its own features with its own
curriculum; rebuild and serve refuse parameters the store's trainer would refuse; two serves and a
read-only store leave the truth behind. Real stores, real trainer and nbr-index processes."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nbr_index import rebuild
from nbr_index.cli import main as nbr_index_cli
from storage import Store, StoreError
from tests.helpers import one_line_error, unit_rows, wait_for

ROOT = Path(__file__).resolve().parents[1]
# One thread per subprocess: the machine's cores are shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
N, DIM = 400, 8
CURRICULUM = {"rounds": 3, "k": 1, "tau": 0.1, "mode": "progressive"}


def trainer_command(*args):
    return [sys.executable, "-m", "trainer.cli", "run", *args]


def nbr_index_command(*args):
    return [sys.executable, "-m", "nbr_index", *map(str, args)]


def assert_one_error_line(completed, message):
    """A finished process of bad input: exit 2, exactly one ``error:`` line on stderr naming the
    problem, no traceback."""
    assert completed.returncode == 2, completed.stdout + completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], completed.stderr
    assert "Traceback" not in completed.stderr
    return errors[0]


def checkpoint_position(run_dir: Path):
    try:
        state = torch.load(run_dir / "checkpoint.pt", weights_only=True, map_location="cpu")
    except Exception:  # absent, or being replaced
        return None
    return state["round"], state["epoch"], [(row["round"], row["epoch"]) for row in state["history"]]


def small_store(path, curriculum=CURRICULUM, feature_rounds=(0,)):
    store = Store.create_or_open(str(path), n=N, dim=DIM, dataset_id="provenance", curriculum=curriculum,
                                 chunk_rows=64)
    for r in feature_rounds:
        store.write_features(r, unit_rows(N, DIM, seed=r))
    return store


# ---------------------------------------------------------------- the trainer checks the rounds it uses

def test_a_k1_trainer_in_service_mode_refuses_a_k5_round_and_rebuild_refuses_to_make_one(tmp_path):
    """The issue's case: while a k = 1 trainer waits in --index service, `nbr-index rebuild --k 5
    --tau 1.0 --selection mutual` (and --rounds 1000, and serve with it) are refused with one line,
    publishing nothing; a k = 5 round planted anyway stops the trainer with one line, untrained."""
    run, store_path = tmp_path / "run", tmp_path / "run" / "store"
    stdout, stderr = open(tmp_path / "trainer.out", "w"), open(tmp_path / "trainer.err", "w")
    trainer = subprocess.Popen(trainer_command("--run-dir", str(run), "--rounds", "1", "--epochs-per-round", "1",
                                               "--seed", "0", "--eval-every", "0", "--index", "service",
                                               "--index-timeout", "300"),
                               env=ENV, stdout=stdout, stderr=stderr, text=True)
    try:
        # Round 0 trained, features/round-0 written and checkpointed: it waits for round 1.
        wait_for(lambda: (checkpoint_position(run) or (0,))[0] == 1 or trainer.poll() is not None,
                 timeout=300, what="the trainer to finish round 0")
        assert trainer.poll() is None, (tmp_path / "trainer.err").read_text()
        store = Store.open(str(store_path))
        assert store.info.curriculum["k"] == 1 and store.complete_feature_rounds() == [0]

        for args, message in (
                (["rebuild", "--round", 1, "--k", 5, "--tau", 1.0, "--selection", "mutual"],
                 f"--k 5 disagrees with the curriculum of store {store.url}, which has k = 1"),
                (["rebuild", "--round", 1, "--rounds", 1000],
                 f"--rounds 1000 disagrees with the curriculum of store {store.url}, which has rounds = 1"),
                (["serve", "--once", "--rounds", 1000], "--rounds 1000 disagrees with the curriculum"),
                (["serve", "--once", "--selection", "mutual"], "which has selection = entropy")):
            refused = subprocess.run(nbr_index_command(args[0], "--store", store.url, *args[1:]), env=ENV,
                                     capture_output=True, text=True, timeout=120)
            assert_one_error_line(refused, message)
            assert store.published_rounds() == [] and store.index_failure(1) is None
            assert not store.describe().get("leftovers")

        # Planted anyway, through the Python API (which takes any parameters): computed from the
        # run's own features, but with k = 5.
        planted = rebuild(store, 1, k=5, tau=1.0, selection="mutual")
        assert planted.published and planted.attrs["source_checksum"] == store.feature_reader(0).checksum
        trainer.wait(timeout=120)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        stdout.close(), stderr.close()
    finished = subprocess.CompletedProcess(trainer.args, trainer.returncode, (tmp_path / "trainer.out").read_text(),
                                           (tmp_path / "trainer.err").read_text())
    assert_one_error_line(finished, f"neighbourhoods/round-1 in {store.url} was computed with k = 5 but this run "
                                    f"uses k = 1")
    # Nothing was trained on it: the checkpoint is still the one of round 0's end.
    assert checkpoint_position(run) == (1, 0, [(0, 0)])
    assert "round 1 epoch" not in finished.stdout
    assert store.complete_feature_rounds() == [0] and store.published_rounds() == [1]


def test_a_resumed_run_refuses_a_round_computed_from_other_features(tmp_path):
    """A round whose source_checksum is not the checksum of the run's own features/round-0 (planted
    with storage's publish_neighbourhoods, with the run's curriculum otherwise) is refused on
    resume, in service and in inline mode, with one line naming both checksums; nothing trains."""
    run = tmp_path / "run"
    first = subprocess.run(trainer_command("--run-dir", str(run), "--rounds", "1", "--epochs-per-round", "1",
                                           "--seed", "0", "--eval-every", "0", "--index", "service",
                                           "--index-timeout", "1"),
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert_one_error_line(first, "timed out after 1s waiting for neighbourhoods/round-1")
    assert checkpoint_position(run) == (1, 0, [(0, 0)])
    store = Store.open(str(run / "store"))
    own = store.feature_reader(0).checksum
    curriculum = store.info.curriculum
    n = store.info.n
    foreign = "f" * 64
    store.publish_neighbourhoods(
        1, ((np.arange(n) + 1) % n).astype(np.int64)[:, None], np.zeros(n, np.float32), np.ones(n, bool),
        {"round": 1, "rounds": curriculum["rounds"], "tau": curriculum["tau"], "fraction": 1.0,
         "mode": curriculum["mode"], "selection": curriculum["selection"], "source_features_round": 0,
         "source_checksum": foreign, "backend": "planted", "seconds": 0.0})

    for index in ("service", "inline"):
        resumed = subprocess.run(trainer_command("--run-dir", str(run), "--resume", "--index", index), env=ENV,
                                 capture_output=True, text=True, timeout=300)
        line = assert_one_error_line(resumed, f"neighbourhoods/round-1 in {store.url} was computed from features "
                                              f"with checksum {foreign[:16]}")
        assert f"this run's features/round-0 have checksum {own[:16]}" in line
        assert checkpoint_position(run) == (1, 0, [(0, 0)])
    assert store.published_rounds() == [1] and store.complete_feature_rounds() == [0]


def test_a_complete_snapshot_is_skipped_only_when_it_is_the_runs_own(tmp_path):
    """write_feature_snapshot on a resumed run: a complete features/round-0 with the checksum of
    the run's rows is left as it is; one of other rows is refused with one line, unchanged."""
    from trainer.provenance import ForeignRound
    from trainer.run_store import write_feature_snapshot
    from trainer.world import World

    store = small_store(tmp_path / "store", feature_rounds=())
    ours, theirs = unit_rows(N, DIM, seed=0), unit_rows(N, DIM, seed=1)
    written = write_feature_snapshot(store, 0, torch.from_numpy(ours), World.single())
    assert written == store.feature_reader(0).checksum == store.features_checksum(ours)
    assert write_feature_snapshot(store, 0, torch.from_numpy(ours), World.single()) == written  # skipped: ours

    with pytest.raises(ForeignRound) as refused:
        write_feature_snapshot(store, 0, torch.from_numpy(theirs), World.single())
    message = str(refused.value)
    assert "\n" not in message and f"features/round-0 in {store.url} is complete with checksum {written[:16]}" in message
    assert f"this run's round-0 features have checksum {store.features_checksum(theirs)[:16]}" in message
    np.testing.assert_array_equal(store.feature_reader(0).read_all(), ours)


# ---------------------------------------------------------------- rebuild and serve follow the store's curriculum

def test_rebuild_takes_the_store_curriculum_and_any_parameters_where_the_store_has_none(tmp_path):
    store = small_store(tmp_path / "store")
    refused = CliRunner().invoke(nbr_index_cli, ["rebuild", "--store", store.url, "--round", "1", "--tau", "0.5"])
    one_line_error(refused, f"--tau 0.5 disagrees with the curriculum of store {store.url}, which has tau = 0.1")
    assert store.published_rounds() == []
    # Given values that agree (and the defaults the curriculum leaves out) are accepted.
    agreed = CliRunner().invoke(nbr_index_cli, ["rebuild", "--store", store.url, "--round", "1", "--k", "1",
                                                "--rounds", "3", "--max-anchor-fraction", "1", "--quiet"])
    assert agreed.exit_code == 0, agreed.output + agreed.stderr
    assert store.read_neighbourhoods(1).attrs["anchors"] == N // 3

    free = small_store(tmp_path / "free", curriculum=None)   # created without a curriculum: today's behaviour
    result = CliRunner().invoke(nbr_index_cli, ["rebuild", "--store", free.url, "--round", "1", "--k", "5",
                                                "--rounds", "1000", "--quiet"])
    assert result.exit_code == 0, result.output + result.stderr
    assert (free.read_neighbourhoods(1).attrs["k"], free.read_neighbourhoods(1).attrs["anchors"]) == (5, 0)


# ---------------------------------------------------------------- serve leftovers

def test_two_serves_publish_each_round_once_and_leave_no_failure(tmp_path):
    store = small_store(tmp_path / "store", feature_rounds=(0, 1, 2))
    logs = [tmp_path / f"serve{i}.log" for i in range(2)]
    serves = []
    for log in logs:
        with open(log, "w") as out:
            serves.append(subprocess.Popen(nbr_index_command("serve", "--store", store.url, "--poll-seconds", 0.1),
                                           env=ENV, stdout=out, stderr=subprocess.STDOUT))
    for serve in serves:
        assert serve.wait(timeout=300) == 0, "\n".join(log.read_text() for log in logs)
    text = "".join(log.read_text() for log in logs)
    assert store.published_rounds() == [1, 2, 3]
    for r in (1, 2, 3):
        assert text.count(f"round {r} published:") == 1, text
        assert store.index_failure(r) is None
    assert not [name for name in os.listdir(Path(store.url) / "neighbourhoods") if name.startswith(".")]
    assert store.verify().ok


def test_a_publish_succeeds_when_another_publishers_staging_cannot_be_removed(tmp_path):
    """The winner of two serves removes the loser's staging once the round is complete; while the
    loser still writes into it, rmtree fails (it meets entries being added), and that clean-up
    must not turn the winner's publish into a failure. An immutable file (chattr +i) makes the
    staging undeletable the same way, for certain."""
    store = small_store(tmp_path / "store")
    other = Path(store.url) / "neighbourhoods" / ".tmp-round-0001-another-publisher"
    other.mkdir(parents=True)
    (other / "chunk").write_bytes(b"still being written")
    if subprocess.run(["chattr", "+i", str(other / "chunk")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system: no way to make the staging undeletable")
    try:
        result = rebuild(store, 1)
        assert result.published and store.published_rounds() == [1] and store.verify().ok
        assert other.exists()   # left for its own writer, or a later publish, to remove
    finally:
        subprocess.run(["chattr", "-i", str(other / "chunk")], check=True)


def test_a_rebuild_that_fails_after_another_process_published_the_round_records_nothing(tmp_path):
    """serve's bookkeeping around a build: when the build raised but the round is published (a
    second serve won the race and, say, removed this one's staging under it), the published round
    is returned and no failure is recorded; a build that failed with the round unpublished is
    recorded as before."""
    from nbr_index.serve import _build_recording_failure
    from nbr_index.shard import ProcessGroupShard

    store = small_store(tmp_path / "store", feature_rounds=(0, 1))

    def loses_the_race(store, round, stop):
        rebuild(store, round)   # the other process publishes
        raise StoreError(f"cannot publish neighbourhood round {round} in store {store.url}: [Errno 39] "
                         f"Directory not empty")

    result = _build_recording_failure(loses_the_race, store, 1, threading.Event(), ProcessGroupShard(0, 1))
    assert (result.round, result.published) == (1, False) and store.index_failure(1) is None

    def fails(store, round, stop):
        raise StoreError("features round 1 is corrupted")

    with pytest.raises(StoreError, match="corrupted"):
        _build_recording_failure(fails, store, 2, threading.Event(), ProcessGroupShard(0, 1))
    assert store.index_failure(2) == "StoreError: features round 1 is corrupted"


def test_serve_on_a_read_only_store_says_why_publishing_failed(tmp_path):
    """Root ignores permission bits: the store is seen through a read-only bind mount."""
    store = small_store(tmp_path / "store")
    view = tmp_path / "read-only"
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", store.url, str(view)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a read-only store needs a bind mount, which is not allowed here: {mounted.stderr.strip()}")
    try:
        remounted = subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True, text=True)
        if remounted.returncode != 0:
            pytest.skip(f"cannot remount the bind mount read-only here: {remounted.stderr.strip()}")
        served = subprocess.run(nbr_index_command("serve", "--store", view, "--once", "--until-round", 1),
                                env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", str(view)], check=True)
    line = assert_one_error_line(served, f"error: cannot publish neighbourhood round 1 in store {view}")
    assert "Read-only file system" in line and "nor could this failure be recorded" in line
    assert store.published_rounds() == [] and store.index_failure(1) is None
    assert store.verify().ok

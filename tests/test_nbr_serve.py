"""nbr-index serve as a real process: rounds as features appear, SIGKILL mid-round, SIGTERM."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import Store
from tests.helpers import unit_rows, wait_for

N, DIM, ROUNDS = 400, 8, 3
REPO = Path(__file__).resolve().parents[1]


def start_serve(store_path, log_path, *extra):
    log = open(log_path, "a")
    process = subprocess.Popen(
        [sys.executable, "-m", "nbr_index", "serve", "--store", str(store_path), "--poll-seconds", "0.1", *extra],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    log.close()
    return process


def log_text(log_path):
    return Path(log_path).read_text()


@pytest.fixture
def store(tmp_path):
    store = Store.create_or_open(str(tmp_path / "store"), n=N, dim=DIM, dataset_id="serve",
                                 curriculum={"rounds": ROUNDS, "k": 1, "tau": 0.1, "mode": "progressive"},
                                 chunk_rows=64)
    store.write_features(0, unit_rows(N, DIM, seed=0))
    return store


@pytest.mark.slow
def test_serve_survives_sigkill_mid_round_and_publishes_every_round_once(store, tmp_path):
    log_path = tmp_path / "serve.log"
    # 1. Killed in the middle of round 1 (the stall hook holds it inside the rebuild).
    first = start_serve(store.url, log_path, "--stall-seconds", "60")
    wait_for(lambda: "rebuilding neighbourhood round 1" in log_text(log_path), what="round 1 to start")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert store.published_rounds() == []

    # 2. Restarted: redoes round 1, then each round as soon as its features are complete.
    second = start_serve(store.url, log_path)
    wait_for(lambda: store.published_rounds() == [1], what="round 1")
    round_one = store.read_neighbourhoods(1).attrs
    store.write_features(1, unit_rows(N, DIM, seed=1))
    wait_for(lambda: store.published_rounds() == [1, 2], what="round 2")
    store.write_features(2, unit_rows(N, DIM, seed=2))
    assert second.wait(timeout=60) == 0  # exits by itself once round R = 3 is published

    assert store.published_rounds() == [1, 2, 3]
    assert store.read_neighbourhoods(1).attrs == round_one  # never published again
    assert [store.read_neighbourhoods(r).attrs["anchors"] for r in (1, 2, 3)] == [133, 266, 400]
    assert [store.read_neighbourhoods(r).attrs["source_features_round"] for r in (1, 2, 3)] == [0, 1, 2]
    text = log_text(log_path)
    for r in (1, 2, 3):
        assert text.count(f"round {r} published:") == 1
    assert "all rounds up to 3 done, exiting" in text
    assert not store.describe().get("leftovers")  # no half-written round left behind

    # 3. A restart after the last round has nothing to do and exits at once.
    third = start_serve(store.url, log_path)
    assert third.wait(timeout=60) == 0
    assert store.published_rounds() == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_abandons_the_round_in_progress_and_exits_cleanly(store, tmp_path):
    log_path = tmp_path / "serve.log"
    process = start_serve(store.url, log_path, "--stall-seconds", "60")
    wait_for(lambda: "rebuilding neighbourhood round 1" in log_text(log_path), what="round 1 to start")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert time.monotonic() - started < 10
    assert store.published_rounds() == []
    assert "round 1 abandoned before publishing" in log_text(log_path)


@pytest.mark.slow
def test_ready_file_exists_exactly_while_serve_watches_the_store(tmp_path):
    ready = tmp_path / "ready"
    ready.write_text("left behind by a killed serve")
    log_path = tmp_path / "serve.log"
    url = str(tmp_path / "store")
    process = start_serve(url, log_path, "--ready-file", str(ready), "--until-round", "1")
    wait_for(lambda: "waiting for the trainer to create it" in log_text(log_path), what="serve to wait for the store")
    assert not ready.exists()  # the stale file is gone before the store is watched

    store = Store.create_or_open(url, n=N, dim=DIM, dataset_id="serve",
                                 curriculum={"rounds": ROUNDS, "k": 1, "tau": 0.1, "mode": "progressive"})
    wait_for(ready.exists, what="the ready file")
    assert process.poll() is None and "serving" in log_text(log_path)
    store.write_features(0, unit_rows(N, DIM, seed=0))
    assert process.wait(timeout=60) == 0
    assert store.published_rounds() == [1]
    assert not ready.exists()


def test_serve_once_with_nothing_ready_and_a_missing_store(store, tmp_path):
    log_path = tmp_path / "serve.log"
    store.write_features(1, unit_rows(N, DIM, seed=1))
    once = start_serve(store.url, log_path, "--once", "--until-round", "2")
    assert once.wait(timeout=60) == 0
    assert store.published_rounds() == [1, 2]
    missing = subprocess.run(
        [sys.executable, "-m", "nbr_index", "serve", "--store", str(tmp_path / "none"), "--once"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: no store at")


def test_a_failed_rebuild_is_recorded_and_stops_the_waiting_trainer_at_once(store, tmp_path):
    """A corrupted feature chunk makes the rebuild of round 1 raise: serve exits non-zero having
    recorded the error in the store, and a trainer waiting for round 1 stops with it at once
    (not after its timeout); a later rebuild of the round clears the record."""
    from trainer.round_anchors import IndexFailed, wait_for_neighbourhoods

    chunk = tmp_path / "store" / "features" / "round-0000" / "rows" / "c" / "1" / "0"
    original = chunk.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))

    log_path = tmp_path / "serve.log"
    serve = start_serve(store.url, log_path, "--until-round", "1")
    assert serve.wait(timeout=120) != 0, log_text(log_path)
    failure = store.index_failure(1)
    assert failure is not None and "features/round-0000/rows/c/1/0 is corrupted" in failure, failure
    assert 1 not in store.published_rounds()

    start = time.monotonic()
    with pytest.raises(IndexFailed, match="failed to rebuild neighbourhoods/round-1 .*is corrupted"):
        wait_for_neighbourhoods(store, 1, timeout=600, say=lambda _: None)
    assert time.monotonic() - start < 10

    chunk.write_bytes(original)
    serve = start_serve(store.url, log_path, "--until-round", "1")
    assert serve.wait(timeout=120) == 0, log_text(log_path)
    assert store.index_failure(1) is None and 1 in store.published_rounds()
    assert store.verify().ok

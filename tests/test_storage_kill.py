"""A writer SIGKILLed at random instants of a publish never leaves a reader a partial round.

Each iteration starts a fresh writer process that publishes features round r and then
neighbourhoods round r + 1, kills it after a random delay within that publish, and checks what a
new reader sees: each round either absent (readers refuse it) or complete, equal to the source
and verified. Then the next publish, over the dead writer's leftovers, must succeed.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storage import Store, StoreError

N, DIM, K, CHUNK = 12000, 32, 8, 500            # 24 chunks per array: many kill points
ITERATIONS = 30
REPO = Path(__file__).resolve().parents[1]

# The writer: prepares its data, says "ready", waits for "go", publishes, says how long it took.
WRITER = r"""
import sys, time
from tests.test_storage_kill import features, neighbourhoods
from storage import Store
url, round = sys.argv[1], int(sys.argv[2])
store = Store.open(url)
bank, nbr = features(round), neighbourhoods(round + 1)
print("ready", flush=True)
sys.stdin.readline()
start = time.perf_counter()
store.write_features(round, bank)
store.publish_neighbourhoods(round + 1, *nbr)
print(f"done {time.perf_counter() - start:.4f}", flush=True)
"""


def features(round: int) -> np.ndarray:
    return np.random.default_rng(round).standard_normal((N, DIM)).astype(np.float32)


def neighbourhoods(round: int):
    rng = np.random.default_rng(1000 + round)
    entropy = rng.random(N, dtype=np.float32)
    attrs = {"tau": 0.1, "fraction": 0.5, "mode": "progressive",
             "source_features_round": round - 1, "backend": "test", "seconds": 0.0}
    return rng.integers(0, N, (N, K), dtype=np.int64), entropy, entropy < 0.5, attrs


def start_writer(url: str, round: int) -> subprocess.Popen:
    """Start a writer for ``round``; it imports and builds its data while we do other things."""
    return subprocess.Popen([sys.executable, "-c", WRITER, url, str(round)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def go(writer: subprocess.Popen) -> None:
    """Wait until the writer is ready, then let it publish."""
    assert writer.stdout.readline().strip() == "ready"
    writer.stdin.write("go\n")
    writer.stdin.flush()


def check_reader_view(url: str, round: int) -> tuple[bool, bool]:
    """What a fresh reader sees: (features complete?, neighbourhoods published?), checking that a
    visible round is whole and correct and an invisible one is refused."""
    store = Store.open(url)
    has_features = round in store.complete_feature_rounds()
    if has_features:
        np.testing.assert_array_equal(store.feature_reader(round).read_all(), features(round))
    else:
        with pytest.raises(StoreError, match="not complete"):
            store.feature_reader(round)
    has_nbr = round + 1 in store.published_rounds()
    if has_nbr:
        got = store.read_neighbourhoods(round + 1)
        neighbours, entropy, anchor, _ = neighbourhoods(round + 1)
        np.testing.assert_array_equal(got.neighbours, neighbours)
        np.testing.assert_array_equal(got.entropy, entropy)
        np.testing.assert_array_equal(got.anchor, anchor)
    else:
        with pytest.raises(StoreError, match="not published"):
            store.read_neighbourhoods(round + 1)
    # Reads check every chunk against its recorded digest; the whole-store verify() runs once
    # at the end (running it here would re-read every earlier round each iteration).
    return has_features, has_nbr


@pytest.mark.slow
def test_sigkill_during_publish_never_exposes_a_partial_round(tmp_path):
    url = str(tmp_path / "store")
    Store.create_or_open(url, N, DIM, "toy-kill", chunk_rows=CHUNK)

    # How long an uninterrupted publish takes, to spread the kills over it.
    proc = start_writer(url, 0)
    go(proc)
    duration = float(proc.stdout.readline().split()[1])
    assert proc.wait(timeout=60) == 0
    assert check_reader_view(url, 0) == (True, True)

    rng = random.Random(1234)
    outcomes = []
    writer = start_writer(url, 1)
    for round in range(1, ITERATIONS + 1):
        go(writer)
        time.sleep(rng.uniform(0.0, 1.2 * duration))
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=30) in (-signal.SIGKILL, 0)   # 0: it finished first
        # The next writer starts (imports) while this round is checked.
        next_writer = start_writer(url, round + 1) if round < ITERATIONS else None
        outcomes.append(check_reader_view(url, round))

        # The next publish over the dead writer's leftovers succeeds (or finds it done). Like the
        # next training run, once it holds the writer lease, it first removes dead writers' staging.
        store = Store.open(url)
        store.remove_dead_staging()
        has_features, has_nbr = outcomes[-1]
        assert store.write_features(round, features(round)) == \
            Store.open(url).feature_reader(round).checksum
        assert store.publish_neighbourhoods(round + 1, *neighbourhoods(round + 1)) is (not has_nbr)
        assert check_reader_view(url, round) == (True, True)
        leftovers = [p for p in store.describe()["leftovers"] if f"round-{round + 1:04d}" in p
                     or f"round-{round:04d}" in p]
        assert leftovers == []           # publishing cleaned the dead writer's staging
        writer = next_writer

    print(f"publish {duration:.3f} s; kills left (features, neighbourhoods) visible:",
          {o: outcomes.count(o) for o in set(outcomes)})
    # A round is never published before the features it follows in this writer.
    assert (False, True) not in outcomes
    final = Store.open(url)
    assert final.complete_feature_rounds() == list(range(ITERATIONS + 1))
    assert final.published_rounds() == list(range(1, ITERATIONS + 2))
    report = final.verify()
    assert report.ok, report.problems

"""The pass split over workers: shares cover every tile once, partial statistics merge bit for bit,
and `nbr-index rebuild --world-size W` as real processes (elastic agent, gloo) publishes what one
process publishes, also after a killed worker is restarted; its bad inputs are one-line errors."""

import json
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
from click.testing import CliRunner

from nbr_index.cli import main
from nbr_index.features import open_features
from nbr_index.fused import BlockSizes, WholePass, knn_entropy_pass, shard_tile_runs
from nbr_index.launch import free_port
from nbr_index.partial import PartialStatistics
from storage import Store
from tests.helpers import unit_rows

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
N, DIM = 700, 16
# The real processes run the CPU's 1024-row tiles: 3 row blocks, so up to 3 workers.
PROCESS_N = 2500
CURRICULUM = {"rounds": 2, "k": 2, "tau": 0.1, "mode": "progressive"}


def duplicate_heavy_rows(n, dim, distinct=40, seed=0):
    return unit_rows(distinct, dim, seed)[np.random.default_rng(seed).integers(0, distinct, n)]


def make_store(path, rows, chunk_rows=128):
    store = Store.create_or_open(str(path), n=rows.shape[0], dim=rows.shape[1], dataset_id="shard",
                                 curriculum=CURRICULUM, chunk_rows=chunk_rows)
    store.write_features(0, rows)
    return store


@pytest.mark.parametrize("blocks", [1, 2, 7, 20])
def test_the_shares_cover_every_tile_exactly_once(blocks):
    upper = {(i, j) for i in range(blocks) for j in range(i, blocks)}
    for count in range(1, blocks + 1):
        shares = [[(run.row_block, j) for run in shard_tile_runs(blocks, index, count)
                   for j in range(run.first_col_block, run.stop_col_block)] for index in range(count)]
        tiles = [tile for share in shares for tile in share]
        assert sorted(tiles) == sorted(upper) and len(tiles) == len(upper)
        sizes = [len(share) for share in shares]
        assert max(sizes) - min(sizes) <= 1  # balanced: every tile is one GEMM


class CollectingShard:
    """Shard `index` of `count` that keeps its partial statistics instead of exchanging them."""

    def __init__(self, index, count):
        self.index, self.count, self.partial = index, count, None

    def combine(self, partial):
        self.partial = PartialStatistics(partial.exp_sum.clone(), partial.exp_dot.clone(),
                                         partial.values.clone(), partial.indices.clone())
        return partial


@pytest.mark.parametrize("rows", [unit_rows(N, DIM, seed=3), duplicate_heavy_rows(N, DIM, seed=4)],
                         ids=["random", "duplicates"])
@pytest.mark.parametrize("tile_kernel", ["native", "torch"])
def test_shard_statistics_merge_to_the_whole_pass_bit_for_bit(rows, tile_kernel):
    tiles = BlockSizes(48)  # 15 row blocks: 120 tiles
    source = open_features(rows, torch.device("cpu"))
    whole = knn_entropy_pass(source, 3, 0.1, block_sizes=tiles, tile_kernel=tile_kernel)
    shards = [CollectingShard(index, 4) for index in range(4)]
    for shard in shards:
        knn_entropy_pass(source, 3, 0.1, block_sizes=tiles, tile_kernel=tile_kernel, shard=shard, workers=1)
    merged = shards[0].partial
    for shard in reversed(shards[1:]):  # any order: the merge is exact
        merged.merge_(shard.partial)
    np.testing.assert_array_equal(merged.indices.numpy(), whole.neighbours.numpy())
    np.testing.assert_array_equal(merged.values.numpy(), whole.similarities.numpy())
    np.testing.assert_array_equal(merged.entropy(N).numpy(), whole.entropy.numpy())


def test_more_shards_than_row_blocks_are_refused():
    with pytest.raises(Exception, match=r"--world-size must be in 1\.\.15 \(the pass has 15 row blocks of 48 rows"):
        knn_entropy_pass(open_features(unit_rows(N, DIM), torch.device("cpu")), 1, 0.1, block_sizes=BlockSizes(48),
                         shard=CollectingShard(0, 16))
    assert WholePass().count == 1


# ---------------------------------------------------------------------------- real processes


def nbr_index(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "nbr_index", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def published(store_path, round_=1):
    return Store.open(str(store_path)).read_neighbourhoods(round_)


def assert_same_round(a, b):
    np.testing.assert_array_equal(a.neighbours, b.neighbours)
    np.testing.assert_array_equal(a.entropy, b.entropy)
    np.testing.assert_array_equal(a.anchor, b.anchor)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three launches of the elastic agent: slow on a loaded 2-core machine
@pytest.mark.parametrize("rows", [unit_rows(PROCESS_N, DIM, seed=5), duplicate_heavy_rows(PROCESS_N, DIM, seed=6)],
                         ids=["random", "duplicates"])
def test_two_workers_publish_what_one_process_publishes(tmp_path, rows):
    one, two = make_store(tmp_path / "one", rows), make_store(tmp_path / "two", rows)
    alone = nbr_index("rebuild", "--store", one.url, "--round", 1, "--quiet")
    assert alone.returncode == 0, alone.stderr
    pair = nbr_index("rebuild", "--store", two.url, "--round", 1, "--world-size", 2, "--json")
    assert pair.returncode == 0, pair.stderr[-3000:]
    report = json.loads(pair.stdout)
    assert report["published"] and report["world_size"] == 2
    assert_same_round(published(one.url), published(two.url))
    # Published exactly once: a second sharded rebuild finds the round and changes nothing.
    again = nbr_index("rebuild", "--store", two.url, "--round", 1, "--world-size", 2, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["published"] is False
    assert Store.open(two.url).published_rounds() == [1]


def _worker_pids(launcher_pid):
    """The spawned worker processes of a launcher (its children running the spawn entry point)."""
    pids = []
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
            pids.append(int(child))
    return sorted(pids)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_killed_worker_is_restarted_and_the_round_is_published_once_as_without_the_kill(tmp_path):
    rows = duplicate_heavy_rows(PROCESS_N, DIM, seed=7)
    whole, killed = make_store(tmp_path / "whole", rows), make_store(tmp_path / "killed", rows)
    assert nbr_index("rebuild", "--store", whole.url, "--round", 1, "--quiet").returncode == 0
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "nbr_index", "rebuild", "--store", killed.url, "--round", "1", "--world-size", "2",
             "--max-restarts", "1", "--stall-seconds", "120", "--json"],
            env=ENV, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
        )
    deadline = time.monotonic() + 600
    while log.read_text().count("stalling") < 2:  # both workers are inside the pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    workers = _worker_pids(process.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert Store.open(killed.url).published_rounds() == [1]
    assert_same_round(published(whole.url), published(killed.url))
    assert not Store.open(killed.url).describe().get("leftovers")


def one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--world-size", 0], "--world-size must be at least 1, got 0"),
    (["--world-size", 2, "--max-restarts", -1], "--max-restarts must be 0 or more"),
    (["--world-size", 2, "--backend", "faiss"], "--world-size 2 needs backend torch"),
    (["--world-size", 2, "--device", "cuda"], "no CUDA GPU is available"),
    # 700 rows are one row block of the CPU's 1024-row tiles: at most one worker.
    (["--world-size", 2], "--world-size must be in 1..1 (the pass has 1 row blocks of 700 rows"),
])
def test_launch_errors_are_one_line_and_publish_nothing(tmp_path, arguments, message):
    store = make_store(tmp_path / "store", unit_rows(N, DIM))
    one_line_error(CliRunner().invoke(main, ["rebuild", "--store", store.url, "--round", "1", *map(str, arguments)]),
                   message)
    assert store.published_rounds() == []


def test_a_rendezvous_port_in_use_is_refused(tmp_path):
    store = make_store(tmp_path / "store", unit_rows(3000, 8), chunk_rows=512)  # 3 row blocks
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["rebuild", "--store", store.url, "--round", "1", "--world-size", "2",
                                           "--master-port", str(port)])
    one_line_error(result, f"rendezvous port {port} is in use")
    assert store.published_rounds() == []


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_workers_of_an_outer_torchrun_that_see_different_stores_publish_nothing(tmp_path):
    """Two processes started as torchrun starts them (RANK, WORLD_SIZE, MASTER_* set), each given
    another store: both stop with the same one line before any tile, and neither store changes."""
    first = make_store(tmp_path / "first", unit_rows(3000, 8, seed=1), chunk_rows=512)
    second = make_store(tmp_path / "second", unit_rows(3000, 8, seed=2), chunk_rows=512)
    port = free_port()
    processes = []
    for rank, store in enumerate((first, second)):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "nbr_index", "rebuild", "--store", store.url, "--round", "1"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO))
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 2, stderr[-3000:]
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines == [lines[0]] and lines[0].startswith("error: worker rank 1 sees source_checksum"), stderr
    assert first.published_rounds() == [] and second.published_rounds() == []

"""Several processes (like torch.distributed ranks, each holding the whole bank) write their own
chunks of one snapshot at the same time; one process completes it."""

import multiprocessing as mp
import os

import numpy as np
import pytest

from storage import Store, StoreError

N, DIM, CHUNK, WORLD = 20000, 32, 1024, 3       # 20 chunks: ranks own 7, 7, 6


def make_bank() -> np.ndarray:
    return np.random.default_rng(11).standard_normal((N, DIM)).astype(np.float32)


def write_rank(url: str, round: int, rank: int, world_size: int, start, queue) -> None:
    """One 'rank': open the store, wait for the others (start barrier), write its chunks."""
    store = Store.open(url).write_as("run-mp")    # the ranks of one run share its staging
    bank = make_bank()            # every rank holds the whole bank
    start.wait()
    queue.put((rank, os.getpid(), store.write_feature_chunks(round, bank, rank, world_size)))


def run_ranks(url: str, round: int, ranks, world_size: int) -> list:
    ctx = mp.get_context("spawn")
    start, queue = ctx.Barrier(len(ranks)), ctx.Queue()
    procs = [ctx.Process(target=write_rank, args=(url, round, rank, world_size, start, queue))
             for rank in ranks]
    for proc in procs:
        proc.start()
    for proc in procs:            # the barrier before complete_features
        proc.join(timeout=120)
        assert proc.exitcode == 0
    return sorted(queue.get(timeout=5) for _ in ranks)


@pytest.mark.slow
def test_ranks_write_disjoint_chunks_concurrently(tmp_path):
    url = str(tmp_path / "store")
    store = Store.create_or_open(url, N, DIM, "toy-mp", chunk_rows=CHUNK).write_as("run-mp")
    store.prepare_features(2)                          # rank 0, before the writers
    results = run_ranks(url, 2, range(WORLD), WORLD)
    assert [r[0] for r in results] == [0, 1, 2] and [r[2] for r in results] == [7, 7, 6]
    assert len({r[1] for r in results}) == WORLD       # really three processes

    checksum = store.complete_features(2)
    bank = make_bank()
    np.testing.assert_array_equal(Store.open(url).feature_reader(2).read_all(), bank)
    # Same checksum as a single process writing the same bank.
    single = Store.create_or_open(str(tmp_path / "single"), N, DIM, "toy-mp", chunk_rows=CHUNK)
    assert single.write_features(2, bank) == checksum
    assert store.verify().ok


@pytest.mark.slow
def test_missing_rank_blocks_completion(tmp_path):
    url = str(tmp_path / "store")
    store = Store.create_or_open(url, N, DIM, "toy-mp", chunk_rows=CHUNK).write_as("run-mp")
    store.prepare_features(0)
    run_ranks(url, 0, [0, 2], WORLD)                   # rank 1 never writes
    with pytest.raises(StoreError) as err:
        store.complete_features(0)
    assert "missing chunks 1, 4, 7, 10, 13, 16, 19 of 20" in str(err.value)
    assert store.complete_feature_rounds() == []


def create_store(url: str, start, queue) -> None:
    start.wait()
    store = Store.create_or_open(url, N, DIM, "toy-mp", chunk_rows=CHUNK)
    queue.put(store.info)


@pytest.mark.slow
def test_ranks_create_the_store_concurrently(tmp_path):
    url = str(tmp_path / "store")
    ctx = mp.get_context("spawn")
    start, queue = ctx.Barrier(WORLD), ctx.Queue()
    procs = [ctx.Process(target=create_store, args=(url, start, queue)) for _ in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    infos = [queue.get(timeout=5) for _ in procs]
    assert all(info == infos[0] for info in infos) and infos[0].n == N
    assert sorted(os.listdir(url)) == ["features", "neighbourhoods", "zarr.json"]

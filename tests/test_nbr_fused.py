"""The fused blocked pass against a float64 brute-force reference: neighbours, ties, entropy."""

import math

import numpy as np
import pytest
import torch

from nbr_index import InvalidFeaturesError, InvalidParameterError, RebuildCancelled, knn_entropy
from nbr_index.features import open_features
from nbr_index import fused
from nbr_index.fused import BlockSizes, knn_entropy_pass
from nbr_index.reference import brute_force_knn_entropy, unfused_knn_entropy
from nbr_index.topk import merge_topk, topk_by_key, topk_lower_index
from tests.helpers import ArrayReader, unit_rows

# Small tiles so that a few hundred rows make many tiles and ragged edges (40 divides the chunked
# test's 200-row reads).
SMALL_TILES = BlockSizes(rows=40)


def duplicate_heavy_rows(n, dim, distinct=25, seed=0):
    """n rows drawn from only `distinct` vectors: every row has exact duplicates (exact ties)."""
    rng = np.random.default_rng(seed)
    return unit_rows(distinct, dim, seed)[rng.integers(0, distinct, n)]


def assert_matches_brute_force(result_neighbours, result_similarities, result_entropy, rows, k, tau):
    neighbours, similarities, entropy = brute_force_knn_entropy(rows, k, tau)
    np.testing.assert_array_equal(result_neighbours, neighbours)
    np.testing.assert_allclose(result_similarities, similarities, atol=3e-7)
    np.testing.assert_allclose(result_entropy, entropy, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("workers", [1, 2])
def test_random_rows_match_brute_force(k, workers):
    rows = unit_rows(500, 16, seed=k)
    result = knn_entropy_pass(open_features(rows, torch.device("cpu")), k, 0.1, block_sizes=SMALL_TILES, workers=workers)
    assert_matches_brute_force(result.neighbours.numpy(), result.similarities.numpy(), result.entropy.numpy(), rows, k, 0.1)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_duplicate_heavy_rows_break_ties_to_the_lower_index(k):
    rows = duplicate_heavy_rows(410, 8)  # ragged last tiles in both directions
    result = knn_entropy_pass(open_features(rows, torch.device("cpu")), k, 0.1, block_sizes=SMALL_TILES)
    assert_matches_brute_force(result.neighbours.numpy(), result.similarities.numpy(), result.entropy.numpy(), rows, k, 0.1)
    # Spelled out for one row: its neighbours are its duplicates, lowest indices first, self skipped.
    twins = np.nonzero((rows == rows[100]).all(axis=1))[0]
    expected = [j for j in twins if j != 100][:k]
    assert result.neighbours[100, : len(expected)].tolist() == expected


def test_entropy_matches_closed_form_on_a_tiny_example():
    # Two orthogonal pairs: z = [[10, 0], [0, 10]] within each 2-row block (tau = 0.1).
    rows = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    result = knn_entropy(rows, k=1, tau=0.1)
    p = np.array([math.exp(10), math.exp(10), 1.0, 1.0])
    p /= p.sum()
    np.testing.assert_allclose(result.entropy, -(p * np.log(p)).sum(), rtol=1e-6)
    assert result.neighbours[:, 0].tolist() == [1, 0, 3, 2]


def test_small_temperatures_neither_overflow_nor_underflow():
    rows = unit_rows(300, 8, seed=3)
    for tau in (0.01, 0.002):
        result = knn_entropy(rows, k=1, tau=tau)
        _, _, entropy = brute_force_knn_entropy(rows, 1, tau)
        assert np.isfinite(result.entropy).all()
        np.testing.assert_allclose(result.entropy, entropy, rtol=1e-4, atol=1e-5)


def test_chunked_reading_gives_the_in_memory_result_and_holds_one_block_pair():
    rows = duplicate_heavy_rows(700, 16, distinct=60, seed=5)
    whole = knn_entropy(rows, k=3, tau=0.1, block_sizes=SMALL_TILES)
    reader = ArrayReader(rows, chunk_rows=100)
    chunked = knn_entropy(reader, k=3, tau=0.1, in_memory_bytes=0, chunk_read_rows=250, block_sizes=SMALL_TILES)
    np.testing.assert_array_equal(chunked.neighbours, whole.neighbours)
    np.testing.assert_allclose(chunked.entropy, whole.entropy, rtol=1e-6)
    # Reads are whole storage chunks (250 rounded down to 200 rows) and never the whole snapshot.
    assert max(stop - start for start, stop in reader.reads) == 200
    assert all(start % 100 == 0 for start, _ in reader.reads)


def test_a_reader_small_enough_is_loaded_whole():
    rows = unit_rows(200, 8)
    reader = ArrayReader(rows, chunk_rows=64)
    knn_entropy(reader, k=1)
    assert reader.reads == [(0, 200)]


def test_unfused_reference_matches_brute_force():
    rows = duplicate_heavy_rows(300, 8, seed=2)
    neighbours, similarities, entropy = unfused_knn_entropy(torch.from_numpy(rows), 3, 0.1, query_rows=64)
    reference = brute_force_knn_entropy(rows, 3, 0.1)
    np.testing.assert_array_equal(neighbours.numpy(), reference[0])
    np.testing.assert_allclose(entropy.numpy(), reference[2], rtol=2e-5, atol=2e-5)


def test_topk_helpers_agree_on_ties():
    values = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -math.inf], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    for select in (topk_lower_index, topk_by_key):
        top_values, columns = select(values, 2)
        assert columns.tolist() == [[1, 2], [0, 1]]
        assert top_values.tolist() == [[3.0, 3.0], [0.5, 0.5]]
    merged_values, merged_indices = merge_topk(
        torch.tensor([[3.0, 1.0]]), torch.tensor([[9, 2]]), torch.tensor([[3.0, 2.0]]), torch.tensor([[4, 1]])
    )
    assert merged_indices.tolist() == [[4, 9]] and merged_values.tolist() == [[3.0, 3.0]]


def test_nan_and_inf_rows_are_named():
    rows = unit_rows(50, 4)
    rows[17, 2] = np.nan
    rows[30, 0] = np.inf
    with pytest.raises(InvalidFeaturesError, match=r"feature row 17 contains NaN or Inf") as info:
        knn_entropy(rows, k=1)
    assert "\n" not in str(info.value)
    reader = ArrayReader(rows, chunk_rows=8)
    with pytest.raises(InvalidFeaturesError, match=r"feature row 17 "):
        knn_entropy(reader, k=1, in_memory_bytes=0)


def test_rows_that_are_not_normalised_are_refused():
    rows = unit_rows(50, 4)
    rows[9] *= 1.01
    with pytest.raises(InvalidFeaturesError, match=r"feature row 9 has L2 norm 1\.01.*L2-normalised"):
        knn_entropy(rows, k=1)


@pytest.mark.parametrize("k", [0, 50, 51])
def test_k_must_leave_room_for_excluding_self(k):
    with pytest.raises(InvalidParameterError, match="k must"):
        knn_entropy(unit_rows(50, 4), k=k)


def test_dimension_mismatch_and_bad_shapes_are_refused():
    with pytest.raises(InvalidFeaturesError, match="dimension 4, expected 8"):
        knn_entropy(unit_rows(50, 4), k=1, expected_dim=8)
    with pytest.raises(InvalidFeaturesError, match="2-D"):
        knn_entropy(np.ones(5, dtype=np.float32), k=1)


def test_reduced_precision_is_refused_on_cpu():
    with pytest.raises(InvalidParameterError, match="CUDA only"):
        knn_entropy(unit_rows(50, 4), k=1, matmul_precision="tf32")


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_reports_tiles_and_can_abandon_the_pass(workers):
    rows = unit_rows(400, 8)
    seen = []
    knn_entropy_pass(open_features(rows, torch.device("cpu")), 1, 0.1, block_sizes=SMALL_TILES, workers=workers,
                     progress=lambda done, total: seen.append((done, total)))
    # 10 row blocks of 40: the 10 x 11 / 2 tiles (I, J), I <= J, of the symmetric pass.
    assert seen[-1] == (55, 55) and all(b >= a for (a, _), (b, _) in zip(seen, seen[1:]))

    def cancel(done, total):
        raise RebuildCancelled("stop")

    threads = torch.get_num_threads()
    with pytest.raises(RebuildCancelled):
        knn_entropy_pass(open_features(rows, torch.device("cpu")), 1, 0.1, block_sizes=SMALL_TILES, workers=workers,
                         progress=cancel)
    assert torch.get_num_threads() == threads  # the pass restores torch's thread setting


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("rows", [unit_rows(450, 16, seed=8), duplicate_heavy_rows(450, 8, seed=9)],
                         ids=["random", "duplicates"])
@pytest.mark.parametrize("logic", ["native", "torch", "sync-free"])
def test_every_tile_path_matches_brute_force(monkeypatch, logic, rows, k):
    """The native kernel, the torch ops, and the CUDA path's sync-free logic (torch ops with first
    arguments and key-based top-k, run here on CPU) give the brute-force neighbours and entropy."""
    if logic == "sync-free":
        monkeypatch.setattr(fused, "SYNC_FREE_DEVICES", ("cuda", "cpu"))
    kernel = "native" if logic == "native" else "torch"
    result = knn_entropy_pass(open_features(rows, torch.device("cpu")), k, 0.1, block_sizes=SMALL_TILES,
                              tile_kernel=kernel)
    assert result.tile_kernel == kernel
    assert_matches_brute_force(result.neighbours.numpy(), result.similarities.numpy(), result.entropy.numpy(),
                               rows, k, 0.1)


def test_chunked_and_in_memory_passes_are_bit_identical():
    rows = duplicate_heavy_rows(700, 16, distinct=60, seed=5)
    whole = knn_entropy(rows, k=3, tau=0.1, block_sizes=SMALL_TILES)
    chunked = knn_entropy(ArrayReader(rows, chunk_rows=100), k=3, tau=0.1, in_memory_bytes=0, chunk_read_rows=250,
                          block_sizes=SMALL_TILES)
    np.testing.assert_array_equal(chunked.neighbours, whole.neighbours)
    np.testing.assert_array_equal(chunked.entropy, whole.entropy)  # the same tiles, sums exact in any order


def test_without_a_compiler_the_pass_runs_on_torch_ops(monkeypatch):
    from nbr_index import native

    monkeypatch.setattr(native, "_compiler", lambda: None)
    rows = unit_rows(200, 8)
    result = knn_entropy(rows, k=1)
    assert result.details["tile_kernel"] == "torch"
    np.testing.assert_array_equal(result.neighbours, brute_force_knn_entropy(rows, 1, 0.1)[0])
    with pytest.raises(Exception, match="tile kernel native needs a C\\+\\+ compiler"):
        knn_entropy(rows, k=1, tile_kernel="native")


def test_a_temperature_too_small_for_loosely_normalised_rows_is_refused():
    rows = unit_rows(100, 8)
    rows[0] *= 0.9995  # within the norm tolerance, but its self term 2^(-1e-3 log2(e) / tau) underflows
    with pytest.raises(InvalidParameterError, match=r"tau = 1e-05 is too small for these rows.*use tau >= "):
        knn_entropy(rows, k=1, tau=1e-5)
    assert np.isfinite(knn_entropy(rows, k=1, tau=0.01).entropy).all()

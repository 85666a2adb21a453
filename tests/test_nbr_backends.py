"""The FAISS backends against the torch backend and the brute-force reference; backend choice."""

import sys

import numpy as np
import pytest

from nbr_index import BackendUnavailableError, InvalidParameterError, knn_entropy
from nbr_index.blocks import row_blocks
from nbr_index.faiss_backend import default_nlist, recall_at_k
from nbr_index.fused import BlockSizes
from nbr_index.reference import brute_force_knn_entropy
from tests.helpers import ArrayReader, unit_rows

TILES = BlockSizes(rows=64)


def assert_same_up_to_float32_rounding(neighbours, expected, rows):
    """Equal lists, except where two neighbours' exact similarities differ by float32 rounding."""
    rows64 = rows.astype(np.float64)
    differ = np.nonzero(neighbours != expected)
    assert len(differ[0]) <= 0.001 * neighbours.size
    got = (rows64[differ[0]] * rows64[neighbours[differ]]).sum(axis=1)
    want = (rows64[differ[0]] * rows64[expected[differ]]).sum(axis=1)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_auto_is_the_fused_torch_path():
    result = knn_entropy(unit_rows(100, 8), k=1, backend="auto")
    assert (result.backend, result.device) == ("torch", "cpu")


@pytest.mark.parametrize("k", [1, 5])
def test_faiss_and_torch_agree_with_brute_force(k):
    rows = unit_rows(600, 16, seed=k)
    reference = brute_force_knn_entropy(rows, k, 0.1)
    torch_result = knn_entropy(rows, k=k, backend="torch", block_sizes=TILES)
    faiss_result = knn_entropy(rows, k=k, backend="faiss", block_sizes=TILES)
    assert faiss_result.backend == "faiss"
    np.testing.assert_array_equal(faiss_result.neighbours, reference[0])
    np.testing.assert_array_equal(torch_result.neighbours, faiss_result.neighbours)
    np.testing.assert_allclose(faiss_result.similarities, torch_result.similarities, atol=5e-7)
    np.testing.assert_array_equal(faiss_result.entropy, torch_result.entropy)  # same blocked pass


@pytest.mark.parametrize("chunked", [False, True])
def test_faiss_follows_the_lower_index_tie_rule_on_duplicates(chunked):
    # FAISS itself returns equal similarities highest id first; the backend must re-order them,
    # and recompute rows whose tie group was cut by the list length (here every row: 20 copies).
    rows = unit_rows(20, 8, seed=1)[np.random.default_rng(1).integers(0, 20, 400)]
    features = ArrayReader(rows, chunk_rows=64) if chunked else rows
    result = knn_entropy(features, k=3, backend="faiss", in_memory_bytes=0, chunk_read_rows=128)
    np.testing.assert_array_equal(result.neighbours, brute_force_knn_entropy(rows, 3, 0.1)[0])
    assert result.details["recomputed_tie_rows"] > 0


def test_ivf_reports_its_recall_against_exact_search():
    rows = unit_rows(4000, 16, seed=7)
    exact = knn_entropy(rows, k=5, backend="torch")
    few_probes = knn_entropy(rows, k=5, backend="faiss-ivf", nprobe=1)
    all_probes = knn_entropy(rows, k=5, backend="faiss-ivf", nprobe=10_000)
    assert few_probes.details["nlist"] == default_nlist(4000) == 4000 // 39  # 4 sqrt(N) = 253, capped
    # recall is measured on a 1000-row sample: close to the recall over all rows.
    assert few_probes.recall == pytest.approx(recall_at_k(few_probes.neighbours, exact.neighbours), abs=0.05)
    assert few_probes.recall < 0.9
    assert all_probes.recall == 1.0
    assert_same_up_to_float32_rounding(all_probes.neighbours, exact.neighbours, rows)
    np.testing.assert_array_equal(few_probes.entropy, exact.entropy)


@pytest.mark.parametrize("stop, rows, start", [(0, 4, 0), (1, 4, 0), (8, 4, 0), (10, 4, 0), (10, 3, 2), (5, 8, 0)])
def test_row_blocks_cover_the_range_in_order(stop, rows, start):
    blocks = list(row_blocks(stop, rows, start=start))
    assert blocks == [(b, min(b + rows, stop)) for b in range(start, stop, rows)]
    assert [r for b, e in blocks for r in range(b, e)] == list(range(start, stop))


def test_recall_at_k_counts_shared_neighbours():
    assert recall_at_k(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 5]])) == 0.75


def test_unknown_backend_and_device_are_refused():
    rows = unit_rows(50, 4)
    with pytest.raises(InvalidParameterError, match="backend must be one of"):
        knn_entropy(rows, backend="annoy")
    with pytest.raises(InvalidParameterError, match="device must be cpu or cuda"):
        knn_entropy(rows, device="tpu")


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU is available"):
        knn_entropy(unit_rows(50, 4), device="cuda")


def test_faiss_backend_without_faiss_installed_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(BackendUnavailableError, match="pip install faiss-cpu"):
        knn_entropy(unit_rows(50, 4), backend="faiss")

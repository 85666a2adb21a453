"""The CUDA path against the float64 reference (skipped without a GPU; run it on a GPU machine).

    pytest tests/test_nbr_cuda.py && nbr-index bench --device cuda --n 1281167 --no-reference
"""

import numpy as np
import pytest
import torch

from nbr_index import knn_entropy
from nbr_index.fused import BlockSizes
from nbr_index.reference import brute_force_knn_entropy
from tests.helpers import unit_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Small tiles: many tiles, ragged edges and off-centre diagonals even at N = 1500.
TILES = BlockSizes(rows=256)


@pytest.mark.parametrize("tile_kernel", ["triton", "torch"])
@pytest.mark.parametrize("k", [1, 4])
def test_cuda_pass_matches_brute_force(tile_kernel, k):
    rows = unit_rows(1500, 32, seed=k)
    result = knn_entropy(rows, k=k, device="cuda", block_sizes=TILES, tile_kernel=tile_kernel)
    neighbours, similarities, entropy = brute_force_knn_entropy(rows, k, 0.1)
    assert result.device == "cuda"
    # cuBLAS may round near-ties differently from float64: allow disagreements only there.
    differ = result.neighbours != neighbours
    assert differ.mean() < 1e-3
    np.testing.assert_allclose(result.similarities, similarities, atol=1e-6)
    np.testing.assert_allclose(result.entropy, entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile_kernel", ["triton", "torch"])
def test_cuda_duplicates_go_to_the_lower_index(tile_kernel):
    rows = unit_rows(30, 16, seed=3)[np.random.default_rng(3).integers(0, 30, 1300)]
    result = knn_entropy(rows, k=3, device="cuda", block_sizes=TILES, tile_kernel=tile_kernel)
    np.testing.assert_array_equal(result.neighbours, brute_force_knn_entropy(rows, 3, 0.1)[0])


# Bounds on the drift of the opt-in reduced-precision GEMMs (20000 x 128 unit rows, k = 1):
# (least top-1 agreement with fp32, largest relative entropy error). A CPU emulation (inputs
# rounded to tf32 / bf16, fp32 accumulation, as cuBLAS does) measured 0.99945 and 9.1e-4 (tf32),
# 0.9948 and 7.0e-3 (bf16); the bounds allow ~10x that many flips and ~10x that error, for
# cuBLAS's truncation and accumulation order.
DRIFT_BOUNDS = {"tf32": (0.995, 1e-2), "bf16": (0.98, 5e-2)}


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_matmul_is_reported_not_assumed(precision):
    """tf32/bf16 are opt-in: this prints how far they drift, and fails beyond DRIFT_BOUNDS."""
    rows = unit_rows(20000, 128, seed=5)
    exact = knn_entropy(rows, k=1, device="cuda")
    fast = knn_entropy(rows, k=1, device="cuda", matmul_precision=precision)
    top1 = float((fast.neighbours[:, 0] == exact.neighbours[:, 0]).mean())
    entropy_error = float((np.abs(fast.entropy - exact.entropy) / exact.entropy).max())
    print(f"{precision}: top-1 agreement {top1:.6f}, max relative entropy error {entropy_error:.2e}")
    assert np.isfinite(fast.entropy).all()
    least_top1, largest_entropy_error = DRIFT_BOUNDS[precision]
    assert top1 >= least_top1 and entropy_error <= largest_entropy_error, (top1, entropy_error)

"""The CUDA path against the float64 reference, and the Triton tile kernel against torch ops (skipped
without a GPU; run it on a GPU machine).

    pytest tests/test_nbr_cuda.py && nbr-index bench --device cuda --n 1281167 --no-reference
"""

import numpy as np
import pytest
import torch

from nbr_index import knn_entropy
from nbr_index.bench import TRITON_ENTROPY_RELATIVE_TOLERANCE, TRITON_TIE_GAP, check_against_torch_ops
from nbr_index.fused import BlockSizes, default_block_sizes
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


# Triton against torch ops on the same GEMM tiles, at the tile size the pass runs on CUDA (16,384 rows)
# and at a small one that is not a multiple of the kernel's 64-row blocks; N is a multiple of neither
# tile, so every pass has full and ragged diagonal and off-diagonal tiles. Rows 0..99 are copied to
# the ragged last tile: exact ties across tiles, which both kernels must give to the lower index.
CUDA_TILE = default_block_sizes(torch.device("cuda")).rows
TRITON_CASES = {"default_tile": (2 * CUDA_TILE + 3215, None), "ragged_small_tile": (4321, BlockSizes(rows=1000))}


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("case", sorted(TRITON_CASES))
def test_triton_matches_torch_ops_at_the_default_and_ragged_tiles(case, k):
    n, tiles = TRITON_CASES[case]
    assert tiles is not None or CUDA_TILE == 16384
    rows = unit_rows(n, 128, seed=11)
    rows[n - 100:] = rows[:100]
    results = {kernel: knn_entropy(rows, k=k, device="cuda", block_sizes=tiles, tile_kernel=kernel)
               for kernel in ("triton", "torch")}
    triton_result, torch_result = results["triton"], results["torch"]
    assert triton_result.details["tile_kernel"] == "triton" and torch_result.details["tile_kernel"] == "torch"
    check = check_against_torch_ops(torch.from_numpy(rows), (triton_result.neighbours, triton_result.entropy),
                                    (torch_result.neighbours, torch_result.entropy))
    print(case, k, check)
    # Row maxima are exact: the neighbours may differ only where similarities tie within TRITON_TIE_GAP
    # (1e-6), and the entropy only by the order of the float32 sums (relative 1e-5).
    assert check["disagreement_max_similarity_gap"] <= TRITON_TIE_GAP, check
    assert check["neighbours_agreement"] >= 1 - 1e-3, check
    assert check["max_entropy_rel_error"] <= TRITON_ENTROPY_RELATIVE_TOLERANCE, check
    np.testing.assert_allclose(triton_result.similarities, torch_result.similarities, rtol=0, atol=1e-6)
    copies = np.arange(n - 100, n)
    for result in (triton_result, torch_result):
        np.testing.assert_array_equal(result.neighbours[copies, 0], np.arange(100))
        np.testing.assert_array_equal(result.neighbours[:100, 0], copies)


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

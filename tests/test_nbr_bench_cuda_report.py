"""What ``nbr-index bench`` adds on CUDA, checked on CPU before a GPU session spends time on it: the
warm-up covers every tile shape the timed pass launches, the Triton vs torch-ops check, and the
report lines the GPU check reads."""

import numpy as np
import pytest
import torch

from nbr_index import bench
from nbr_index.fused import BlockSizes, WholePass, plan_tiles, tile_rows
from nbr_index.reference import brute_force_knn_entropy
from tests.helpers import unit_rows


def tile_shapes(n: int, block_rows: int) -> set[tuple[bool, int, int]]:
    """(diagonal, rows, columns) of every tile of the pass over n rows with tiles of block_rows."""
    block_rows = tile_rows(n, BlockSizes(block_rows))
    shapes = set()
    for pair in plan_tiles(n, block_rows, n, WholePass()):
        for run in pair.runs:
            for column_block in range(run.first_col_block, run.stop_col_block):
                rows = min(block_rows, n - run.row_block * block_rows)
                columns = min(block_rows, n - column_block * block_rows)
                shapes.add((column_block == run.row_block, rows, columns))
    return shapes


@pytest.mark.parametrize("n, block_rows", [
    (1_281_167, 16384),          # ImageNet at the CUDA tile: 78 full row blocks and 3,215 rows
    (2 * 16384, 16384), (16384 + 5, 16384), (40_000, 16384), (16384, 16384), (3000, 1024), (700, 1024),
])
def test_the_warm_up_pass_has_every_tile_shape_of_the_timed_pass(n, block_rows):
    rows = bench.warm_up_rows(n, tile_rows(n, BlockSizes(block_rows)))
    assert tile_shapes(rows, block_rows) == tile_shapes(n, block_rows)
    assert rows <= 3 * block_rows


def test_the_triton_check_passes_on_near_ties_and_fails_on_a_wrong_neighbour_or_entropy():
    rows = unit_rows(200, 16, seed=4)
    rows[7] = rows[3]                               # 3 and 7 are exact copies: a tie for row 11, next to them
    rows[11] = rows[3] + 0.05 * unit_rows(1, 16, seed=5)[0]
    rows[11] /= np.linalg.norm(rows[11])
    features = torch.from_numpy(rows)
    neighbours, _, entropy = brute_force_knn_entropy(rows, 2, 0.1)
    entropy = entropy.astype(np.float32)
    same = bench.check_against_torch_ops(features, (neighbours, entropy), (neighbours.copy(), entropy.copy()))
    assert same["passed"] and same["rows"] == 200 and same["neighbours_agreement"] == 1.0
    assert same["disagreement_max_similarity_gap"] == 0.0 and same["max_entropy_abs_error"] == 0.0

    assert neighbours[11].tolist() == [3, 7]
    tied = neighbours.copy()
    tied[11] = [7, 3]                               # the copies the other way round: the same similarity
    near_tie = bench.check_against_torch_ops(features, (tied, entropy), (neighbours, entropy))
    assert near_tie["passed"] and near_tie["top1_agreement"] == 1 - 1 / 200
    assert near_tie["disagreement_max_similarity_gap"] < 1e-12 and near_tie["neighbours_agreement"] == 1 - 2 / 400

    for position in (0, 1):                         # a neighbour that is not a tie, first or second
        wrong = neighbours.copy()
        wrong[0, position] = neighbours[0, 1 - position]
        check = bench.check_against_torch_ops(features, (wrong, entropy), (neighbours, entropy))
        assert not check["passed"] and check["disagreement_max_similarity_gap"] > 1e-4, check
    drifted = entropy * np.float32(1 + 1e-4)
    assert not bench.check_against_torch_ops(features, (neighbours, drifted), (neighbours, entropy))["passed"]


def test_the_cuda_report_lines_the_gpu_check_reads():
    report = bench.run_speed_bench(600, dim=16, reference=False)
    features = bench.random_unit_vectors(600, 16)
    neighbours, _, entropy = brute_force_knn_entropy(features.numpy(), 1, 0.1)
    output = (neighbours, entropy.astype(np.float32))
    report["check_vs_torch_ops"] = bench.check_against_torch_ops(features, output, output)
    report["triton_tile_resources"] = [
        {"variant": variant, "arch": 90, "num_warps": 8, "triton": "3.6.0", "ptxas": "12.8", "registers": registers,
         "stack_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0}
        for variant, registers in (("diagonal", 104), ("off_diagonal", 168))
    ]
    lines = bench.format_speed_report(report).splitlines()
    ratio = report["ratios"]["fused_over_full_matmul"]
    assert f"  ratio (c)/(e) {ratio:.2f} (GPU target <= 1.6)" in lines
    assert any(line.startswith("  check (c) vs (c'): passed on 600 rows: neighbours agreement 1.000000")
               for line in lines), lines
    assert ("  triton tile kernel off_diagonal (sm_90, 8 warps, triton 3.6.0, ptxas 12.8): 168 registers, "
            "stack 0 B, spill stores 0 B, spill loads 0 B") in lines
    report["triton_tile_resources"] = "unavailable: ResourceUsageUnavailable: no ptxas"
    assert "  triton tile kernel registers: unavailable: ResourceUsageUnavailable: no ptxas" in \
        bench.format_speed_report(report).splitlines()

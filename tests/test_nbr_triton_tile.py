"""The CUDA tile kernel (triton_tile.py) without a GPU: its results under Triton's interpreter against
the float64 brute force, and its register use compiled for sm_90 (ptxas, no GPU needed).

TRITON_INTERPRET must be set before triton is imported, hence the interpreter runs in a child process
(about 20 s on 2 busy cores: the interpreter runs each program in Python).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, math
import numpy as np, torch
import nbr_index.fused as fused
from nbr_index.triton_tile import BLOCK_ROWS, tile_statistics
from nbr_index.features import open_features
from nbr_index.fused import BlockSizes, knn_entropy_pass
from nbr_index.reference import brute_force_knn_entropy

checks = {}
torch.manual_seed(0)
g = torch.rand(37, 45) * 2 - 1
g[:, 7] = g.max(dim=1).values + 1
g[:, 30] = g[:, 7]                      # a tie at the row maximum: the first column must win
g[20] = g.max(dim=0).values + 1
g[33] = g[20]                           # a tie at the column maximum: the first row must win
scale, shift = 14.4, 14.0
row_sum, row_dot, row_max, row_arg, col_sum, col_dot, col_max, col_arg = tile_statistics(
    g, scale, shift, diagonal=False, columns=True, block_rows=16, block_columns=16)
y = g * scale - shift
e = torch.exp2(y)
checks["row_sums"] = bool(torch.allclose(row_sum, e.sum(1)) and torch.allclose(row_dot, (e * y).sum(1)))
checks["column_sums"] = bool(torch.allclose(col_sum, e.sum(0)) and torch.allclose(col_dot, (e * y).sum(0)))
expected_max, expected_arg = torch.max(g, dim=1)
checks["row_top1"] = bool(torch.equal(row_max, expected_max) and torch.equal(row_arg, expected_arg))
expected_max, expected_arg = torch.max(g, dim=0)
checks["column_top1"] = bool(torch.equal(col_max, expected_max) and torch.equal(col_arg, expected_arg))

square = torch.rand(40, 40)
square.fill_diagonal_(5.0)              # self is the largest entry of every row, and must be skipped
row_sum, _, row_max, row_arg, col_sum, *_ = tile_statistics(square, scale, shift, diagonal=True, columns=False,
                                                            block_rows=16, block_columns=16)
masked = square.clone()
masked.fill_diagonal_(-math.inf)
expected_max, expected_arg = torch.max(masked, dim=1)
checks["self_skipped"] = bool(torch.equal(row_max, expected_max) and torch.equal(row_arg, expected_arg)
                              and col_sum is None)
checks["self_in_sums"] = bool(torch.allclose(row_sum, torch.exp2(square * scale - shift).sum(1)))


def unit(rows):
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


rng = np.random.default_rng(1)
base = unit(rng.standard_normal((130, 16)))
# name: (rows, tile rows). Every pass has diagonal and off-diagonal tiles, and a ragged last tile.
cases = {
    # 200 = 2 x 96 + 8; 96 = 64 + 32: the kernel's blocks are ragged inside every tile too.
    "random": (unit(rng.standard_normal((200, 16))), 96),
    # 12 distinct rows, each ~12 times: ties everywhere, in one tile and across tiles (-> lower index);
    # tiles of 40 < the kernel's block of 64: one masked program per tile; 150 = 3 x 40 + 30.
    "duplicates": (unit(rng.standard_normal((12, 8)))[rng.integers(0, 12, 150)], 40),
    # rows 30..99 each have one exact copy 100 rows on, in a later tile: the copy is the top-1 both ways.
    "copies": (np.concatenate([base, base[30:100]]), 96),
}
assert BLOCK_ROWS == 64
for name, (rows, tile) in cases.items():
    for k, merge in ((1, "host"), (5, "host"), (5, "sync_free")):
        # k > 1 merges on CPU by default with host syncs; CUDA runs the sync-free merge, here forced on CPU.
        fused.SYNC_FREE_DEVICES = ("cuda", "cpu") if merge == "sync_free" else ("cuda",)
        result = knn_entropy_pass(open_features(rows, torch.device("cpu")), k, 0.1, block_sizes=BlockSizes(tile),
                                  workers=1, tile_kernel="triton")
        neighbours, similarities, entropy = brute_force_knn_entropy(rows, k, 0.1)
        checks[f"{name}_k{k}_{merge}"] = {
            "tile_kernel": result.tile_kernel,
            "neighbours_equal": bool((result.neighbours.numpy() == neighbours).all()),
            "max_similarity_error": float(np.abs(result.similarities.numpy() - similarities).max()),
            "max_entropy_abs_error": float(np.abs(result.entropy.numpy() - entropy).max()),
        }
print(json.dumps(checks))
"""

TILE_CHECKS = ["row_sums", "column_sums", "row_top1", "column_top1", "self_skipped", "self_in_sums"]
PASS_CHECKS = [f"{name}_k{k}_{merge}" for name in ("random", "duplicates", "copies")
               for k, merge in ((1, "host"), (5, "host"), (5, "sync_free"))]
# float32 similarities from the float32 GEMM against float64: unit rows of 8-16 dimensions.
SIMILARITY_TOLERANCE = 1e-6
# The entropy from float32 tile sums against float64 (measured <= 1e-6 here; the CPU pass is held to
# atol 1e-5, rtol 2e-6 in tests/test_nbr_fused.py).
ENTROPY_TOLERANCE = 1e-5


def test_triton_tile_kernel_matches_the_float64_brute_force_under_the_interpreter():
    # Prepend the repository, keep what PYTHONPATH had (the GPU machine brings zarr in through it).
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": python_path}, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    checks = json.loads(completed.stdout.strip().splitlines()[-1])
    assert sorted(checks) == sorted(TILE_CHECKS + PASS_CHECKS)
    assert all(checks[name] is True for name in TILE_CHECKS), {name: checks[name] for name in TILE_CHECKS}
    for name in PASS_CHECKS:
        print(name, checks[name])
        check = checks[name]
        assert check["tile_kernel"] == "triton" and check["neighbours_equal"], (name, check)
        assert check["max_similarity_error"] <= SIMILARITY_TOLERANCE, (name, check)
        assert check["max_entropy_abs_error"] <= ENTROPY_TOLERANCE, (name, check)


def _resource_usage_or_skip(**arguments) -> dict:
    from nbr_index.triton_tile import ResourceUsageUnavailable, resource_usage

    try:
        return resource_usage(**arguments)
    except ResourceUsageUnavailable as error:
        pytest.skip(f"the compile-only register check cannot run here: {error}")


@pytest.mark.parametrize("diagonal", [True, False], ids=["diagonal", "off_diagonal"])
def test_the_launched_tile_kernel_does_not_spill_on_sm90(diagonal):
    """The warps each variant launches with leave no stack and no spills, with registers below the
    255 cap (at the cap the next change spills). Measured numbers: nbr_index/triton_tile.py."""
    from nbr_index.triton_tile import tile_warps

    usage = _resource_usage_or_skip(diagonal=diagonal)
    print(usage)
    assert usage["num_warps"] == tile_warps(diagonal)
    assert usage["stack_bytes"] == 0 and usage["spill_store_bytes"] == 0 and usage["spill_load_bytes"] == 0, usage
    assert usage["registers"] < 255, usage


def test_the_compile_only_check_sees_a_spill():
    """Off the diagonal at 2 warps (64 elements a thread) the kernel spills: the check must say so."""
    usage = _resource_usage_or_skip(diagonal=False, num_warps=2)
    assert usage["stack_bytes"] > 0 and usage["spill_store_bytes"] > 0 and usage["spill_load_bytes"] > 0, usage

"""The CUDA tile kernel (triton_tile.py), run on CPU by Triton's interpreter in a child process (about
a minute: the interpreter runs each program in Python).

TRITON_INTERPRET must be set before triton is imported, hence the subprocess.
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
from nbr_index.triton_tile import tile_statistics
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

rng = np.random.default_rng(1)
rows = rng.standard_normal((12, 8)).astype(np.float32)
rows = rows[rng.integers(0, 12, 150)]
rows /= np.linalg.norm(rows, axis=1, keepdims=True)
for k in (1, 3):
    result = knn_entropy_pass(open_features(rows, torch.device("cpu")), k, 0.1, block_sizes=BlockSizes(32),
                              workers=1, tile_kernel="triton")
    neighbours, _, entropy = brute_force_knn_entropy(rows, k, 0.1)
    checks[f"pass_neighbours_k{k}"] = bool((result.neighbours.numpy() == neighbours).all())
    checks[f"pass_entropy_k{k}"] = bool(np.allclose(result.entropy.numpy(), entropy, rtol=2e-6, atol=1e-5))
print(json.dumps(checks))
"""


def test_triton_tile_kernel_matches_the_torch_ops_under_the_interpreter():
    completed = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}, timeout=540,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    checks = json.loads(completed.stdout.strip().splitlines()[-1])
    assert checks == {key: True for key in checks} and len(checks) == 10, checks

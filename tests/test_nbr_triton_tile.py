"""The CUDA tile kernel (triton_tile.py), run on CPU by Triton's interpreter in a child process.

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
y = torch.randn(6, 45) * 3 - 5
y[:, 7] = y.max(dim=1).values + 1
y[:, 30] = y[:, 7]                      # a tie at the row maximum: the first column must win
s, t, value, column = tile_statistics(y, self_offset=2, block=16)   # row i's self is column i + 2
masked = y.clone()
masked.diagonal(2).fill_(-math.inf)
expected_value, expected_column = torch.max(masked, dim=1)
e = torch.exp2(y)
checks["sums"] = bool(torch.allclose(s, e.sum(1)) and torch.allclose(t, (e * y).sum(1)))
checks["top1"] = bool(torch.equal(value, expected_value) and torch.equal(column, expected_column))
checks["self_skipped"] = column.tolist()[5] == 30  # row 5's self is column 7

rng = np.random.default_rng(1)
rows = rng.standard_normal((12, 8)).astype(np.float32)
rows = rows[rng.integers(0, 12, 150)]
rows /= np.linalg.norm(rows, axis=1, keepdims=True)
result = knn_entropy_pass(open_features(rows, torch.device("cpu")), 1, 0.1, block_sizes=BlockSizes(32, 48),
                          workers=1, tile_kernel="triton")
neighbours, _, entropy = brute_force_knn_entropy(rows, 1, 0.1)
checks["pass_neighbours"] = bool((result.neighbours.numpy() == neighbours).all())
checks["pass_entropy"] = bool(np.allclose(result.entropy.numpy(), entropy, rtol=2e-6, atol=1e-5))
print(json.dumps(checks))
"""


def test_triton_tile_kernel_matches_the_torch_ops_under_the_interpreter():
    completed = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    checks = json.loads(completed.stdout.strip().splitlines()[-1])
    assert checks == {key: True for key in checks} and len(checks) == 5, checks

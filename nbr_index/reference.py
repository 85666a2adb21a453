"""Plain, obviously-correct versions of the k-NN + entropy computation, for tests and benchmarks.

- :func:`brute_force_knn_entropy`: float64 numpy, the whole N x N matrix at once. The ground
  truth for tests (small N only).
- :func:`unfused_knn_entropy`: the straightforward blocked torch version the design measured
  as the anchor (block matmul, topk, logsumexp, sum p*z, one separate pass each).
"""

from __future__ import annotations

import numpy as np
import torch

from .blocks import row_blocks
from .topk import topk_lower_index


def brute_force_knn_entropy(features: np.ndarray, k: int, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact neighbours, similarities and entropy in float64.

    features: (N, d). Returns neighbours (N, k) int64 (self excluded, larger similarity first,
    ties -> lower index), similarities (N, k) float64, entropy (N,) float64 where
    H_i = logsumexp_j z_ij - sum_j p_ij z_ij over all j (self included), z = m m^T / tau.
    """
    m = np.asarray(features, dtype=np.float64)
    n = m.shape[0]
    # einsum's plain loops give identical vectors bit-identical dot products wherever they sit
    # (a BLAS GEMM need not: its edge tiles can round differently), so exact ties stay ties.
    similarity = np.einsum("id,jd->ij", m, m)
    logits = similarity / tau
    log_partition = np.logaddexp.reduce(logits, axis=1)
    p = np.exp(logits - log_partition[:, None])
    entropy = log_partition - (p * logits).sum(axis=1)

    neighbours = np.empty((n, k), dtype=np.int64)
    columns = np.arange(n)
    for i in range(n):
        others = columns != i
        # lexsort sorts by the last key first: similarity descending, then index ascending.
        order = np.lexsort((columns[others], -similarity[i, others]))[:k]
        neighbours[i] = columns[others][order]
    similarities = np.take_along_axis(similarity, neighbours, axis=1)
    return neighbours, similarities, entropy


def unfused_knn_entropy(
    features: torch.Tensor, k: int, tau: float, query_rows: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocked, unfused k-NN + entropy: per query block, the full (B, N) row of similarities.

    features: (N, d) float32. Returns neighbours (N, k) int64 (ties -> lower index),
    similarities (N, k) float32, entropy (N,) float32. Memory O(B N).
    """
    n = features.shape[0]
    neighbours = torch.empty((n, k), dtype=torch.int64)
    similarities = torch.empty((n, k), dtype=torch.float32)
    entropy = torch.empty(n, dtype=torch.float32)
    for start, stop in row_blocks(n, query_rows):
        sims = features[start:stop] @ features.T  # (B, N)
        logits = sims / tau
        log_partition = torch.logsumexp(logits, dim=1)
        p = torch.exp(logits - log_partition[:, None])
        entropy[start:stop] = log_partition - (p * logits).sum(dim=1)
        rows = torch.arange(stop - start, device=features.device)
        sims[rows, rows + start] = -torch.inf  # self is not its own neighbour
        similarities[start:stop], neighbours[start:stop] = topk_lower_index(sims, k)
    return neighbours, similarities, entropy

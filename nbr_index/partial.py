"""The per-row state of the blocked pass, and how the states of two workers merge.

A worker (a thread of the pass, or a rank of a sharded rebuild) accumulates, over the tiles it
computes, for every row i of the N x N similarity matrix:

    exp_sum[i] = sum_j 2^y_ij            exp_dot[i] = sum_j 2^y_ij y_ij        (fixed point)
    values[i], indices[i] = the k best (m_i . m_j, j) seen so far, j != i, best first

with y_ij = m_i . m_j log2(e) / tau - shift, one shift for the whole pass (``fused.py``). These are
the statistics of an online softmax; because every worker uses the same shift, which the pass
fixes before any tile is computed, merging two of them needs no rescaling: the sums add and the
top-k sets merge. The sums are kept in fixed point (int64 counts of 2^-fraction_bits), so that
adding them is exact: the result does not depend on which worker computed which tile, nor on the
order of the additions, and a rebuild sharded over W workers publishes bit for bit what one
process publishes. The top-k merge keeps the total order "larger similarity first, then the lower
index", which is independent of the order too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .topk import merge_top1, merge_topk


def fraction_bits(n: int) -> int:
    """Fractional bits of the fixed-point sums for N rows: a sum of N terms <= 1 fits in int64.

    Every term 2^y (y <= 0) is at most 1 and |2^y y| at most 1/(e ln 2) < 1, so |sum| <= N and
    N 2^bits < 2^62. At N = 10^6 that is 42 bits (a resolution of 2.3e-13, next to a self term ~1).
    """
    return 62 - max(int(n), 1).bit_length()


@dataclass
class PartialStatistics:
    """exp_sum, exp_dot (N,) int64 fixed point; values (N, k) float32 dot products and indices
    (N, k) int64 (sentinel N: none yet), or None when the pass computes no neighbours (k = 0)."""

    exp_sum: torch.Tensor
    exp_dot: torch.Tensor
    values: torch.Tensor | None
    indices: torch.Tensor | None

    @classmethod
    def empty(cls, n: int, k: int, device: torch.device) -> "PartialStatistics":
        values = indices = None
        if k > 0:
            values = torch.full((n, k), -math.inf, dtype=torch.float32, device=device)
            # Sentinel n: any real candidate with an equal (-inf) value has a lower index and wins.
            indices = torch.full((n, k), n, dtype=torch.int64, device=device)
        zeros = torch.zeros(n, dtype=torch.int64, device=device)
        return cls(zeros, zeros.clone(), values, indices)

    @property
    def k(self) -> int:
        return 0 if self.values is None else self.values.shape[1]

    def merge_(self, other: "PartialStatistics") -> "PartialStatistics":
        """In place: self <- the statistics of both workers' tiles (other's are disjoint)."""
        self.exp_sum += other.exp_sum
        self.exp_dot += other.exp_dot
        if self.values is not None:
            self.merge_candidates_(slice(0, self.values.shape[0]), other.values, other.indices)
        return self

    def merge_candidates_(self, rows: slice, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Merge (R, m) candidate (value, index) pairs of rows ``rows`` into their top-k."""
        merge_best_(self.values[rows], self.indices[rows], values, indices)

    def entropy(self, n: int) -> torch.Tensor:
        """(N,) float32 H_i in nats: H = ln s - ln 2 * t / s (t is in base-2 units of y)."""
        unit = 2.0 ** fraction_bits(n)
        exp_sum = self.exp_sum.double() / unit
        exp_dot = self.exp_dot.double() / unit
        return (torch.log(exp_sum) - math.log(2.0) * exp_dot / exp_sum).to(torch.float32)


def merge_best_(values: torch.Tensor, indices: torch.Tensor, candidate_values: torch.Tensor,
                candidate_indices: torch.Tensor) -> None:
    """In place: (R, k) best (values, indices) <- the k best of them and (R, m) candidates.

    Better = larger value, or equal value and lower index; the indices of the two sets are distinct.
    """
    if values.shape[1] == 1 and candidate_values.shape[1] == 1:
        merge_top1(values[:, 0], indices[:, 0], candidate_values[:, 0], candidate_indices[:, 0])
        return
    merged_values, merged_indices = merge_topk(values, indices, candidate_values, candidate_indices)
    values.copy_(merged_values)
    indices.copy_(merged_indices)

"""The AND objective as pure functions (Eq 2, 3, 7).

p_ij = softmax_j(x_i . m_j / tau) over ALL N memory rows (Eq 2), computed as log_softmax so
that -log p never takes the log of an underflowed probability.

- instance term (non-anchors): -log p_ii
- neighbourhood term (anchors): -log sum_{j in {i} U N_k(i)} p_ij = -logsumexp_j log p_ij
  (the authors' code sums the anchor's own p_ii with its k neighbours')
- L = mean over the batch (Eq 7 divided by the batch size, as the authors' code does).

The memory bank enters as a constant (no gradient); gradients flow into the features only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def log_probs(features: torch.Tensor, memory: torch.Tensor, tau: float) -> torch.Tensor:
    """log p (B, N) for features (B, d) against memory (N, d) at temperature tau (Eq 2)."""
    return F.log_softmax(features @ memory.t() / tau, dim=1)


def and_loss_per_sample(features: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor,
                        anchor: torch.Tensor | None, neighbours: torch.Tensor | None, tau: float) -> torch.Tensor:
    """Per-sample AND loss (B,).

    features (B, d) L2-normalised; memory (N, d); indices (B,) int64 rows of the batch samples in
    the bank; anchor (N,) bool or None (no anchors: the instance loss); neighbours (N, k) int64
    (rows of non-anchors are ignored; entries < 0 or equal to the anchor itself are skipped, so
    the anchor is never counted twice); tau > 0.
    """
    logp = log_probs(features, memory, tau)
    self_lp = logp.gather(1, indices.view(-1, 1)).squeeze(1)  # log p_ii (B,)
    if anchor is None:
        return -self_lp
    nbrs = neighbours.index_select(0, indices)  # (B, k)
    skip = (nbrs < 0) | (nbrs == indices.view(-1, 1))
    nbr_lp = logp.gather(1, nbrs.clamp_min(0)).masked_fill(skip, float("-inf"))  # (B, k)
    hood_lp = torch.logsumexp(torch.cat([self_lp.unsqueeze(1), nbr_lp], dim=1), dim=1)
    is_anchor = anchor.index_select(0, indices)
    return -torch.where(is_anchor, hood_lp, self_lp)


def and_loss(features: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor,
             anchor: torch.Tensor | None, neighbours: torch.Tensor | None, tau: float) -> torch.Tensor:
    """Scalar AND loss (Eq 7 / batch size); with ``anchor`` None it is the instance loss (Eq 2)."""
    return and_loss_per_sample(features, memory, indices, anchor, neighbours, tau).mean()


def instance_loss(features: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor, tau: float) -> torch.Tensor:
    """Scalar instance loss -mean_i log p_ii (Wu et al. 2018; Eq 2 / batch size)."""
    return and_loss(features, memory, indices, None, None, tau)

"""The memory bank M (N, d): one L2-normalised row per training sample, never trained by autograd.

The bank is a plain tensor (``requires_grad`` False). The loss reads it as a constant; after
the optimizer step the loop applies the EMA update (Eq 8) with the (indices, features) that
all ranks produced in that step, gathered in rank order, so every replica of the bank stays
identical.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def init_memory(n: int, dim: int, generator: torch.Generator, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, dim) float32: standard-normal rows, L2-normalised (uniform on the sphere).

    Drawn on the CPU from ``generator`` then moved, so the initial bank is the same on any device.
    """
    rows = torch.randn(n, dim, generator=generator)
    return F.normalize(rows, dim=1).to(device)


def last_occurrence(indices: torch.Tensor) -> torch.Tensor:
    """Positions (U,) of the last occurrence of each distinct value in ``indices`` (B,), in
    increasing value order. Sort-based (stable), so deterministic on every device."""
    sorted_idx, order = torch.sort(indices, stable=True)
    is_last = torch.ones_like(sorted_idx, dtype=torch.bool)
    is_last[:-1] = sorted_idx[1:] != sorted_idx[:-1]
    return order[is_last]


@torch.no_grad()
def ema_update_(memory: torch.Tensor, indices: torch.Tensor, features: torch.Tensor, eta: float = 0.5) -> None:
    """In place: m_i <- normalise((1 - eta) m_i + eta x_i) for each (i, x_i) (Eq 8).

    memory (N, d); indices (B,) int64; features (B, d), detached (cast to the bank's dtype).
    Duplicate indices in one update (a distributed sampler's padding, or a sample drawn twice):
    the LAST occurrence wins, i.e. m_i <- normalise((1 - eta) m_i + eta x_last) with the m_i from
    before this update; earlier occurrences in the same update are ignored. This makes the
    result independent of how index_copy orders duplicate writes.
    """
    keep = last_occurrence(indices)
    rows = indices[keep]
    new = (1.0 - eta) * memory.index_select(0, rows) + eta * features[keep].to(memory.dtype)
    memory.index_copy_(0, rows, F.normalize(new, dim=1))

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


def last_occurrence_of_each(indices: torch.Tensor) -> torch.Tensor:
    """(B,) int64: for each position i, the position of the last occurrence of indices[i].

    Sort-based (stable), so deterministic on every device, and free of data-dependent shapes,
    so a GPU never waits for the host: [5, 2, 5, 7, 2, 5] -> [5, 4, 5, 3, 4, 5].
    """
    batch = indices.numel()
    sorted_idx, order = torch.sort(indices, stable=True)
    positions = torch.arange(batch, device=indices.device)
    is_last = torch.ones_like(sorted_idx, dtype=torch.bool)
    is_last[:-1] = sorted_idx[1:] != sorted_idx[:-1]
    # In sorted order, the end of each run of equal values: the nearest is_last at or after p.
    run_end = torch.where(is_last, positions, torch.full_like(positions, batch))
    run_end = torch.flip(torch.cummin(torch.flip(run_end, [0]), 0).values, [0])
    # Back to batch order by gathering with the inverse permutation (a gather, unlike a
    # scatter, has one deterministic kernel everywhere).
    return order[run_end].index_select(0, torch.argsort(order))


@torch.no_grad()
def ema_update_(memory: torch.Tensor, indices: torch.Tensor, features: torch.Tensor, eta: float = 0.5) -> None:
    """In place: m_i <- normalise((1 - eta) m_i + eta x_i) for each (i, x_i) (Eq 8).

    memory (N, d); indices (B,) int64; features (B, d), detached (cast to the bank's dtype).
    Duplicate indices in one update (a distributed sampler's padding, or a sample drawn twice):
    the LAST occurrence wins, i.e. m_i <- normalise((1 - eta) m_i + eta x_last) with the m_i from
    before this update; earlier occurrences in the same update are ignored. Every occurrence
    computes that same row, so the result does not depend on how index_copy orders duplicate
    writes.
    """
    source = last_occurrence_of_each(indices)
    new = (1.0 - eta) * memory.index_select(0, indices) + eta * features.index_select(0, source).to(memory.dtype)
    memory.index_copy_(0, indices, F.normalize(new, dim=1))

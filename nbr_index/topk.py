"""Top-k selection with an exact tie rule: larger value first, then the LOWER column index.

``torch.topk`` does not promise which of several equal values it returns, and the memory bank
of a young network is full of near-duplicates (and exact duplicates on tiny data sets), so the
blocked pass uses these helpers to make its neighbours identical to a brute-force reference.

Shapes: ``values`` (B, C) float32 with the self entries already set to -inf; indices are
int64 column numbers; a "best" set is (B, k) values with (B, k) indices, ordered best first.
"""

from __future__ import annotations

import torch


def topk_lower_index(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) best values and (B, k) columns, ties at equal value going to the lower column.

    ``torch.topk`` picks the k-th value correctly but, when several columns share it, may pick
    any of them. Only rows where more than k entries reach the k-th value are affected; those
    few rows are re-ranked with a stable descending sort, which keeps lower columns first.
    The within-k order of equal values is fixed later by :func:`merge_topk`'s ordering, so here
    only the selected *set* matters; it is returned ordered anyway.
    """
    top_values, top_columns = torch.topk(values, k, dim=1, largest=True, sorted=True)
    kth_value = top_values[:, -1:]
    boundary_tied = (values >= kth_value).sum(dim=1) > k
    tied_rows = torch.nonzero(boundary_tied).flatten()
    if tied_rows.numel() > 0:
        sorted_values, sorted_columns = torch.sort(
            values.index_select(0, tied_rows), dim=1, descending=True, stable=True
        )
        top_values[tied_rows] = sorted_values[:, :k]
        top_columns[tied_rows] = sorted_columns[:, :k]
    return order_best_first(top_values, top_columns)


def topk_by_key(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as :func:`topk_lower_index` without any host synchronisation (for CUDA).

    Each float32 value becomes an int64 key: its order-preserving 32-bit integer image in the
    high half and (2^32 - 1 - column) in the low half, so keys are unique and a larger key means
    a larger value or, on equal values, a lower column. ``topk`` on unique keys is exact.
    """
    bits = (values + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0 (they compare equal)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    columns = torch.arange(values.shape[1], device=values.device, dtype=torch.int64)
    keys = (ordered << 32) | (0xFFFFFFFF - columns)
    _, top_columns = torch.topk(keys, k, dim=1, largest=True, sorted=True)
    return values.gather(1, top_columns), top_columns


def merge_top1(
    best_values: torch.Tensor,
    best_indices: torch.Tensor,
    candidate_values: torch.Tensor,
    candidate_indices: torch.Tensor,
) -> None:
    """In place: keep, per row, the better of the running best and a candidate (all (B,)).

    Better = larger value, or equal value and lower index; no host synchronisation.
    """
    take = (candidate_values > best_values) | (
        (candidate_values == best_values) & (candidate_indices < best_indices)
    )
    best_values.copy_(torch.where(take, candidate_values, best_values))
    best_indices.copy_(torch.where(take, candidate_indices, best_indices))


def merge_topk(
    best_values: torch.Tensor,
    best_indices: torch.Tensor,
    candidate_values: torch.Tensor,
    candidate_indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of a running (B, k) set and (B, k') candidates, ordered best first.

    Indices in the two sets are distinct (each column is visited once per row).
    """
    k = best_values.shape[1]
    values = torch.cat([best_values, candidate_values], dim=1)
    indices = torch.cat([best_indices, candidate_indices], dim=1)
    values, indices = order_best_first(values, indices)
    return values[:, :k].contiguous(), indices[:, :k].contiguous()


def order_best_first(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by value descending, equal values by index ascending (B, m) -> (B, m).

    Two sorts: by index ascending, then a stable sort by value descending, which keeps the
    index order among equal values.
    """
    by_index = torch.argsort(indices, dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, by_value), indices.gather(1, by_value)

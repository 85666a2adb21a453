"""One Triton kernel for the per-tile statistics of the fused pass on CUDA.

After the GEMM writes a (R, C) tile of raw dot products g, the torch-ops path runs a dozen
memory-bound passes over it (the logits, exp2, e * y, row and column sums, row and column
maxima). On a GPU those passes cost more than the GEMM itself (an fp32 16384 x 16384 x 128 GEMM
is ~1.1 ms on an H200; each 1 GiB pass over the tile is ~0.25-0.5 ms), so this kernel reads the
tile ONCE. With y = scale * g - shift it produces, per row and (off the diagonal) per column:

    exp_sum = sum 2^y          exp_dot = sum 2^y y          (self included)
    top_value, top_index = the largest g other than self, and its FIRST (lowest) column / row

Program (i, j) takes the (BM, BN) block at rows i BM.., columns j BN.. and writes its partial
statistics of each row to slot j and of each column to slot i; torch then reduces over the
slots in slot order (deterministic, no atomics): sums add, and the first slot holding the
maximum has the lowest index. On a diagonal tile the self entries g[r, r] count in the sums but
not in the maxima.

Tested on CPU with Triton's interpreter (TRITON_INTERPRET=1), see tests/test_nbr_triton_tile.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NO_INDEX = 2**31 - 1


@triton.jit
def _tile_statistics_kernel(
    g_ptr, row_stride, n_rows, n_columns, scale, shift,
    row_sum_ptr, row_dot_ptr, row_max_ptr, row_arg_ptr,
    column_sum_ptr, column_dot_ptr, column_max_ptr, column_arg_ptr,
    DIAGONAL: tl.constexpr, COLUMNS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    block_row, block_column = tl.program_id(0), tl.program_id(1)
    rows = block_row * BM + tl.arange(0, BM)
    columns = block_column * BN + tl.arange(0, BN)
    row_inside, column_inside = rows < n_rows, columns < n_columns
    inside = row_inside[:, None] & column_inside[None, :]
    g = tl.load(g_ptr + rows[:, None].to(tl.int64) * row_stride + columns[None, :], mask=inside, other=0.0)
    y = g * scale - shift
    e = tl.where(inside, tl.exp2(y), 0.0)
    ey = tl.where(inside, e * y, 0.0)
    candidate = tl.where(inside, g, float("-inf"))
    if DIAGONAL:
        candidate = tl.where(rows[:, None] == columns[None, :], float("-inf"), candidate)

    row_max = tl.max(candidate, axis=1)
    row_arg = tl.min(tl.where(candidate == row_max[:, None], columns[None, :], 2147483647), axis=1)
    row_slot = block_column * n_rows + rows
    tl.store(row_sum_ptr + row_slot, tl.sum(e, axis=1), mask=row_inside)
    tl.store(row_dot_ptr + row_slot, tl.sum(ey, axis=1), mask=row_inside)
    tl.store(row_max_ptr + row_slot, row_max, mask=row_inside)
    tl.store(row_arg_ptr + row_slot, row_arg, mask=row_inside)
    if COLUMNS:
        column_max = tl.max(candidate, axis=0)
        column_arg = tl.min(tl.where(candidate == column_max[None, :], rows[:, None], 2147483647), axis=0)
        column_slot = block_row * n_columns + columns
        tl.store(column_sum_ptr + column_slot, tl.sum(e, axis=0), mask=column_inside)
        tl.store(column_dot_ptr + column_slot, tl.sum(ey, axis=0), mask=column_inside)
        tl.store(column_max_ptr + column_slot, column_max, mask=column_inside)
        tl.store(column_arg_ptr + column_slot, column_arg, mask=column_inside)


def tile_statistics(tile: torch.Tensor, scale: float, shift: float, diagonal: bool, columns: bool,
                    block_rows: int = 64, block_columns: int = 64):
    """Per-row (and, with ``columns``, per-column) statistics of one (R, C) float32 tile with unit
    column stride: (row_sum, row_dot, row_max, row_arg, column_sum, column_dot, column_max,
    column_arg), float32 (R,) / (C,) and int64 local indices; the column entries are None without
    ``columns``. The same tuple as ``fused._torch_tile_statistics``.
    """
    rows, cols = tile.shape
    assert tile.stride(1) == 1 and tile.dtype == torch.float32
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_columns))

    def slots(count: int, length: int):
        return (torch.empty((count, length), dtype=torch.float32, device=tile.device),
                torch.empty((count, length), dtype=torch.float32, device=tile.device),
                torch.empty((count, length), dtype=torch.float32, device=tile.device),
                torch.empty((count, length), dtype=torch.int32, device=tile.device))

    row_slots = slots(grid[1], rows)
    column_slots = slots(grid[0], cols) if columns else row_slots  # unused without columns
    _tile_statistics_kernel[grid](
        tile, tile.stride(0), rows, cols, scale, shift, *row_slots, *column_slots,
        DIAGONAL=diagonal, COLUMNS=columns, BM=block_rows, BN=block_columns,
    )
    row_stats = _reduce_slots(*row_slots)
    column_stats = _reduce_slots(*column_slots) if columns else (None, None, None, None)
    return (*row_stats, *column_stats)


def _reduce_slots(sums: torch.Tensor, dots: torch.Tensor, maxima: torch.Tensor, arguments: torch.Tensor):
    """(slots, L) partials -> (L,) totals; the first slot holding the maximum has the lowest index."""
    maximum, slot = torch.max(maxima, dim=0)
    argument = arguments.gather(0, slot.unsqueeze(0)).squeeze(0).to(torch.int64)
    return sums.sum(dim=0), dots.sum(dim=0), maximum, argument

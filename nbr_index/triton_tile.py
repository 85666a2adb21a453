"""One Triton kernel for the per-tile statistics of the fused pass on CUDA.

After the GEMM writes a (B, C) tile of shifted base-2 logits y, the eager path runs five
memory-bound passes over it (exp2, sum, e*y, sum, max). On a GPU those passes cost more than
the GEMM itself (an fp32 (8192 x 32768 x 128) GEMM is ~1.5 ms on an H100; each 1 GiB pass over
the tile is ~0.3-0.6 ms), so this kernel reads the tile ONCE and produces, per row:

    exp_sum[i] = sum_j 2^y_ij            exp_dot[i] = sum_j 2^y_ij * y_ij     (self included)
    top_value[i], top_column[i] = max over j != self of y_ij, and its FIRST (lowest) column

One program per row walks the row in BLOCK-wide chunks. Each lane keeps its own running best
with a strict ">" (so the earlier column wins on ties within a lane); the final reduction takes
the lowest column among the lanes that hold the maximum, i.e. the first maximal column.

Tested on CPU with Triton's interpreter (TRITON_INTERPRET=1), see tests/test_nbr_triton_tile.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NO_COLUMN = 2**31 - 1


@triton.jit
def _tile_statistics_kernel(
    logits_ptr, row_stride, n_columns, self_offset,
    exp_sum_ptr, exp_dot_ptr, top_value_ptr, top_column_ptr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    row_start = logits_ptr + row.to(tl.int64) * row_stride
    self_column = row + self_offset  # column of this row's own entry (may lie outside the tile)
    exp_sum = tl.zeros([BLOCK], dtype=tl.float32)
    exp_dot = tl.zeros([BLOCK], dtype=tl.float32)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_column = tl.full([BLOCK], 2147483647, dtype=tl.int32)
    for start in range(0, n_columns, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        inside = columns < n_columns
        y = tl.load(row_start + columns, mask=inside, other=float("-inf"))
        e = tl.exp2(y)  # 0 outside the row
        exp_sum += e
        exp_dot += e * tl.where(inside, y, 0.0)  # 0 outside, never 0 * -inf
        candidate = tl.where(columns == self_column, float("-inf"), y)
        better = candidate > best
        best = tl.where(better, candidate, best)
        best_column = tl.where(better, columns, best_column)
    top_value = tl.max(best, axis=0)
    top_column = tl.min(tl.where(best == top_value, best_column, 2147483647), axis=0)
    tl.store(exp_sum_ptr + row, tl.sum(exp_sum, axis=0))
    tl.store(exp_dot_ptr + row, tl.sum(exp_dot, axis=0))
    tl.store(top_value_ptr + row, top_value)
    tl.store(top_column_ptr + row, top_column)


def tile_statistics(logits: torch.Tensor, self_offset: int, block: int = 1024):
    """Per-row statistics of one (B, C) float32 tile with unit column stride.

    self_offset: the column of row i's own entry is i + self_offset (b_start - c_start).
    Returns exp_sum (B,), exp_dot (B,), top_value (B,) float32 and top_column (B,) int64 (local
    column; NO_COLUMN where every candidate is -inf).
    """
    rows, columns = logits.shape
    assert logits.stride(1) == 1 and logits.dtype == torch.float32
    exp_sum = torch.empty(rows, dtype=torch.float32, device=logits.device)
    exp_dot = torch.empty_like(exp_sum)
    top_value = torch.empty_like(exp_sum)
    top_column = torch.empty(rows, dtype=torch.int32, device=logits.device)
    _tile_statistics_kernel[(rows,)](
        logits, logits.stride(0), columns, self_offset,
        exp_sum, exp_dot, top_value, top_column,
        BLOCK=min(block, triton.next_power_of_2(columns)),
    )
    return exp_sum, exp_dot, top_value, top_column.to(torch.int64)

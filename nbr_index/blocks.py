"""The walk over consecutive row blocks that the passes share (like faiss.contrib's
``database_iterator``, but yielding row ranges: each caller reads or slices what it needs)."""

from __future__ import annotations

from collections.abc import Iterator


def row_blocks(stop: int, rows: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """``(block_start, block_stop)`` of the blocks of ``rows`` rows that cover ``start..stop`` in
    order; the last block may be shorter. The same ranges as ``range(start, stop, rows)`` with
    ``min(block_start + rows, stop)``."""
    for block_start in range(start, stop, rows):
        yield block_start, min(block_start + rows, stop)

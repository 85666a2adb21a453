"""One blocked pass over the symmetric N x N similarities: top-k neighbours and the entropy of every row.

For memory-bank rows m_i (N, d), L2-normalised, and temperature tau:

    z_ij = m_i . m_j / tau                      logits of the non-parametric softmax (Eq 2)
    p_ij = softmax_j(z_ij)                      over ALL N rows, self included
    H_i  = -sum_j p_ij log p_ij                 entropy (Eq 5), queried with m_i itself
    N_k(i) = the k largest m_i . m_j, j != i    neighbours (Eq 1), ties -> lower j

Symmetry: the rows are cut into blocks of B rows, and a tile is the (B, B) product of two blocks.
M M^T is symmetric, so only the tiles (I, J) with I <= J are computed, in one GEMM each (half
the work of the full matrix): an off-diagonal tile updates the statistics of the rows of I from
its rows and those of the rows of J from its columns (what rows of J see of rows of I); a
diagonal tile (I, I) holds every pair of its block and updates its rows only. Both sides of a
pair read the same float32 dot product, so j is i's neighbour by exactly the value by which i is
j's.

Why no running maximum (the usual online softmax): a safe softmax subtracts the row maximum
before exp, and a streaming one keeps a running maximum and rescales its partial sums when it
grows. Here a bound is known before the pass: by Cauchy-Schwarz z_ij <= max_j |m_j|^2 / tau, so
with ONE shift for every row (in base 2, as the tiles compute: exp2 is ~3x cheaper than exp)

    y_ij = log2(e) (z_ij - max |m|^2 / tau) <= 0       2^y_ij <= 1 never overflows,

and the self term y_ii = log2(e) (|m_i|^2 - max |m|^2) / tau is within 4 x (norm tolerance) / tau
of 0 (checked on the data: :func:`_check_self_terms`), so no row sum underflows. The entropy is
shift-invariant and exact from two sums per row,

    s_i = sum_j 2^y_ij,   t_i = sum_j 2^y_ij y_ij,   H_i = ln s_i - ln 2 t_i / s_i,

and, with one shift for all, the statistics of two sets of tiles merge by adding them, which is
what lets threads and ranks split the tiles (``partial.py``: fixed-point sums, exact in any order).

Per tile, after the GEMM (the raw dot products, never rescaled, so that the neighbour order is
that of the float32 similarities themselves): s, t and the first maximal column of every row
and, off the diagonal, of every column. On CPU one native kernel (``tile_kernel.cpp``,
``native.py``) does all of that in one read of the tile; without a C++ compiler the same
statistics come from torch ops. On CUDA, torch ops (``tile_kernel="torch"``) or one Triton
kernel (``triton_tile.py``) that reads the tile once; CUDA runs without host synchronisation
(no ``.any()``, no ``nonzero``): every tile runs a branch-free merge.

Every GEMM has the same (B, B) shape (a ragged last block is zero-padded) so that identical rows
get bit-identical dot products wherever they sit, which the lower-index tie rule relies on.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .checks import check_k, check_tau
from .errors import BackendUnavailableError, InvalidParameterError
from .features import DEFAULT_NORM_TOLERANCE, FeatureSource, scan_row_norms
from .partial import PartialStatistics, fraction_bits, merge_best_
from .topk import topk_by_key, topk_lower_index

LOG2_E = 1.0 / math.log(2.0)

MATMUL_PRECISIONS = ("fp32", "tf32", "bf16")
TILE_KERNELS = ("auto", "native", "triton", "torch")

# Devices whose pass runs without host synchronisation (tests add "cpu" to run that logic here).
SYNC_FREE_DEVICES = ("cuda",)

# progress(done_tiles, total_tiles); may raise RebuildCancelled to abandon the pass.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BlockSizes:
    """Row blocks of ``rows`` rows: every tile of the pass is a (rows, rows) block of logits."""

    rows: int


# CPU: a 1024-row tile of float32 logits is 4 MiB, inside a core's share of a typical L3, where
# the GEMM runs at full speed while smaller tiles pay more per-call overhead.
CPU_BLOCKS = BlockSizes(rows=1024)
# CUDA: large tiles keep the GEMM efficient and amortise launch overhead (1 GiB per buffer).
CUDA_BLOCKS = BlockSizes(rows=16384)


def default_block_sizes(device: torch.device) -> BlockSizes:
    return CUDA_BLOCKS if device.type == "cuda" else CPU_BLOCKS


class Shard(Protocol):
    """Which part of the tiles this worker computes, and how the workers' statistics combine.

    ``index`` of ``count`` workers; ``combine(partial)`` returns the statistics of ALL workers'
    tiles (``nbr_index.shard.ProcessGroupShard`` all-reduces them over a process group).
    """

    index: int
    count: int

    def combine(self, partial: PartialStatistics) -> PartialStatistics: ...


@dataclass(frozen=True)
class WholePass:
    """The one-worker shard: every tile, nothing to combine."""

    index: int = 0
    count: int = 1

    def combine(self, partial: PartialStatistics) -> PartialStatistics:
        return partial


@dataclass
class PassResult:
    """Output of :func:`knn_entropy_pass`, all on CPU.

    neighbours: (N, k) int64 or None when k == 0; similarities: (N, k) float32 or None;
    entropy: (N,) float32; tile_kernel: the tile statistics that ran ("native", "torch", "triton").
    """

    neighbours: torch.Tensor | None
    similarities: torch.Tensor | None
    entropy: torch.Tensor
    seconds: float
    tile_kernel: str = "torch"


def knn_entropy_pass(
    source: FeatureSource,
    k: int,
    tau: float,
    *,
    block_sizes: BlockSizes | None = None,
    matmul_precision: str = "fp32",
    norm_tolerance: float = DEFAULT_NORM_TOLERANCE,
    workers: int | None = None,
    tile_kernel: str = "auto",
    progress: Progress | None = None,
    shard: Shard | None = None,
) -> PassResult:
    """Top-k neighbours (self excluded) and entropy (self included) of every row, one pass.

    source: the (N, d) rows, whole or in chunks (``features.open_features``).
    k: neighbours per row, 0 for the entropy alone (the FAISS backends); 0 <= k < N.
    matmul_precision: "fp32" (exact, default); "tf32" or "bf16" (CUDA only, faster GEMM with
    reduced input precision; measure with ``nbr-index bench --device cuda`` before using).
    workers: CPU threads, each running whole tile rows with single-threaded torch ops
    (default: torch.get_num_threads()); CUDA always uses one.
    tile_kernel: "native" (CPU: the compiled one-read kernel), "triton" (CUDA: the one-read
    Triton kernel; under TRITON_INTERPRET=1 on CPU for tests), "torch" (torch ops, any device),
    "auto" = native on CPU when a C++ compiler is there, else torch. Triton stays opt-in until a
    GPU run (tests/test_nbr_cuda.py) has confirmed it.
    progress: called as progress(done_tiles, total_tiles) from the calling thread; it may raise
    (e.g. RebuildCancelled) to abandon the pass.
    shard: compute only this worker's share of the tiles and combine with the other workers'
    (default: all tiles in this process). The tiles and their shares depend on N and the block
    size only, so any number of workers gives the same result.
    """
    started = time.perf_counter()
    n, device = source.n, source.device
    _check_pass_arguments(n, k, tau, matmul_precision, device)
    shard = shard or WholePass()
    block_rows = tile_rows(n, block_sizes or default_block_sizes(device))
    check_shard_count(n, block_rows, shard.count)
    kernel_name, native_kernel, triton_statistics = _tile_statistics_kernel(tile_kernel, device)
    workers = 1 if device.type == "cuda" else max(1, workers or torch.get_num_threads())

    norms = scan_row_norms(source, norm_tolerance)  # (N,) float64, validates every row
    scale = LOG2_E / tau
    max_squared = float(norms.max()) ** 2
    _check_self_terms(norms, scale, max_squared, n, tau)
    geometry = _TileGeometry(n=n, block_rows=block_rows, scale=scale, shift=scale * max_squared,
                             unit=2.0 ** fraction_bits(n))
    plan = plan_tiles(n, block_rows, _super_rows(source.read_rows, block_rows), shard)
    partials = [PartialStatistics.empty(n, k, device) for _ in range(workers)]
    tile_workers = [
        _TileWorker(geometry, partial, matmul_precision, device, native_kernel, triton_statistics)
        for partial in partials
    ]
    with _cuda_matmul_precision(device, matmul_precision), intra_op_threads(1 if workers > 1 else None):
        run_plan(source, plan, tile_workers, progress)

    total = partials[0]
    for other in partials[1:]:
        total.merge_(other)
    total = shard.combine(total)
    entropy = total.entropy(n).cpu()
    neighbours = similarities = None
    if k > 0:
        neighbours, similarities = total.indices.cpu(), total.values.cpu()
    return PassResult(neighbours, similarities, entropy, time.perf_counter() - started, kernel_name)


def tile_rows(n: int, block_sizes: BlockSizes) -> int:
    """Rows per block: the requested size, or N when the data is smaller (no padding wasted)."""
    if block_sizes.rows < 1:
        raise InvalidParameterError(f"block rows must be >= 1, got {block_sizes.rows}")
    return min(block_sizes.rows, n)


def row_block_count(n: int, block_rows: int) -> int:
    return math.ceil(n / block_rows)


def check_shard_count(n: int, block_rows: int, count: int) -> None:
    """A pass can be split over 1..(number of row blocks) workers."""
    blocks = row_block_count(n, block_rows)
    if not 1 <= count <= blocks:
        raise InvalidParameterError(
            f"--world-size must be in 1..{blocks} (the pass has {blocks} row blocks of {block_rows} rows "
            f"for N = {n}), got {count}"
        )


# ---------------------------------------------------------------------------------- the tiles


@dataclass(frozen=True)
class TileRun:
    """Tiles (row_block, c) for c in [first_col_block, stop_col_block): one GEMM each."""

    row_block: int
    first_col_block: int
    stop_col_block: int

    @property
    def tiles(self) -> int:
        return self.stop_col_block - self.first_col_block


@dataclass(frozen=True)
class SuperBlockPair:
    """The tile runs whose rows lie in super-block ``rows`` and columns in super-block ``columns``:
    in chunked mode those two super-blocks are what is in memory while they run."""

    rows: tuple[int, int]  # global row range [start, stop)
    columns: tuple[int, int]
    runs: list[TileRun]


def shard_tile_runs(blocks: int, index: int, count: int) -> list[TileRun]:
    """Worker ``index`` of ``count``: a contiguous share of the tiles (I, J), I <= J, row-major.

    The T = blocks (blocks + 1) / 2 tiles are numbered row by row; worker w takes numbers
    [floor(w T / count), floor((w + 1) T / count)). Every tile costs one (B, B) GEMM, so the
    shares are balanced, and contiguous, so each worker touches few row blocks.
    """
    total = blocks * (blocks + 1) // 2
    first, stop = index * total // count, (index + 1) * total // count
    runs = []
    row_start = 0  # number of the tile (I, I)
    for row_block in range(blocks):
        row_tiles = blocks - row_block
        lo, hi = max(first, row_start), min(stop, row_start + row_tiles)
        if lo < hi:
            runs.append(TileRun(row_block, row_block + lo - row_start, row_block + hi - row_start))
        row_start += row_tiles
    return runs


def plan_tiles(n: int, block_rows: int, super_rows: int, shard: Shard) -> list[SuperBlockPair]:
    """This worker's tile runs grouped by (row super-block, column super-block), in read order."""
    per_super = super_rows // block_rows
    pairs: dict[tuple[int, int], list[TileRun]] = {}
    for run in shard_tile_runs(row_block_count(n, block_rows), shard.index, shard.count):
        row_super = run.row_block // per_super
        column = run.first_col_block
        while column < run.stop_col_block:
            column_super = column // per_super
            stop = min(run.stop_col_block, (column_super + 1) * per_super)
            pairs.setdefault((row_super, column_super), []).append(TileRun(run.row_block, column, stop))
            column = stop

    def rows_of(super_block: int) -> tuple[int, int]:
        return super_block * super_rows, min(n, (super_block + 1) * super_rows)

    return [SuperBlockPair(rows_of(p), rows_of(q), runs) for (p, q), runs in sorted(pairs.items())]


def _super_rows(read_rows: int, block_rows: int) -> int:
    """Rows per read: a whole number of row blocks (at least one)."""
    return max(block_rows, read_rows // block_rows * block_rows)


@dataclass
class _Task:
    """One tile run with the two super-blocks it reads (views, starting at global rows_start / columns_start)."""

    run: TileRun
    rows: torch.Tensor
    rows_start: int
    columns: torch.Tensor
    columns_start: int


def run_plan(source: FeatureSource, plan: list[SuperBlockPair], workers: list, progress: Progress | None) -> None:
    """Read the super-blocks of ``plan`` and hand its tile runs to ``workers`` (objects with ``run(task)``)."""
    pool = _TileWorkerPool(sum(run.tiles for pair in plan for run in pair.runs), progress)
    loaded_rows, rows = None, None
    for pair in plan:
        if pair.rows != loaded_rows:
            rows, loaded_rows = source.read(*pair.rows), pair.rows
        columns = rows if pair.columns == pair.rows else source.read(*pair.columns)
        tasks = [_Task(run, rows, pair.rows[0], columns, pair.columns[0]) for run in pair.runs]
        pool.run(tasks, workers)


@dataclass(frozen=True)
class _TileGeometry:
    n: int
    block_rows: int
    scale: float  # log2(e) / tau
    shift: float  # scale * max |m|^2: y = scale * g - shift <= 0
    unit: float  # 2^fraction_bits of the fixed-point sums


class GemmWorker:
    """Runs tile runs GEMM by GEMM into a preallocated (B, B) buffer; ``after_gemm`` gets each tile.

    Every GEMM has the full (B, B) shape: a ragged last block is zero-padded. BLAS libraries pick
    different kernels for different shapes, and those round differently, so without padding two
    identical rows, one in a full block and one in the ragged block, could get dot products one
    ulp apart and the lower-index tie rule would fail on exact duplicates.
    """

    def __init__(self, block_rows: int, n: int, device, matmul_precision: str = "fp32"):
        self.block_rows, self.n, self.matmul_precision = block_rows, n, matmul_precision
        self.products = torch.empty((block_rows, block_rows), dtype=torch.float32, device=device)
        self.padded: dict[str, torch.Tensor] = {}

    def run(self, task: _Task) -> int:
        """All tiles of one run; returns the number of tiles done."""
        b = self.block_rows
        row_start = task.run.row_block * b
        row_stop = min(row_start + b, self.n)
        queries = self._full_block("rows", task.rows[row_start - task.rows_start : row_stop - task.rows_start])
        for column_block in range(task.run.first_col_block, task.run.stop_col_block):
            column_start = column_block * b
            column_stop = min(column_start + b, self.n)
            database = self._full_block(
                "columns", task.columns[column_start - task.columns_start : column_stop - task.columns_start]
            )
            _gemm(queries, database, self.matmul_precision, out=self.products)
            tile = self.products[: row_stop - row_start, : column_stop - column_start]
            self.after_gemm(tile, row_start, column_start, diagonal=column_block == task.run.row_block)
        return task.run.tiles

    def after_gemm(self, tile: torch.Tensor, row_start: int, column_start: int, diagonal: bool) -> None:
        """Nothing: a bare GEMM pass (``nbr-index bench`` times it as the floor of the fused pass)."""

    def _full_block(self, name: str, block: torch.Tensor) -> torch.Tensor:
        """(B, d) rows: a view when full, a zero-padded copy when ragged."""
        rows = block.shape[0]
        if rows == self.block_rows:
            return block
        padded = self.padded.get(name)
        if padded is None:
            padded = self.padded[name] = block.new_zeros((self.block_rows, block.shape[1]))
        padded[:rows] = block
        padded[rows:] = 0
        return padded


class _TileWorker(GemmWorker):
    """A GEMM worker that folds each tile into its own :class:`PartialStatistics`."""

    def __init__(self, geometry: _TileGeometry, partial: PartialStatistics, matmul_precision: str, device,
                 native_kernel=None, triton_statistics=None):
        super().__init__(geometry.block_rows, geometry.n, device, matmul_precision)
        self.geometry, self.partial = geometry, partial
        self.native_kernel, self.triton_statistics = native_kernel, triton_statistics
        self.sync_free = device.type in SYNC_FREE_DEVICES
        b = geometry.block_rows
        if native_kernel is not None:
            self.scratch = torch.empty(4 * b, dtype=torch.float64)
            self.maxima = torch.empty((2, b), dtype=torch.float32)
        elif triton_statistics is None:  # torch ops: logits and exponentials of the tile
            self.logits = torch.empty((b, b), dtype=torch.float32, device=device)
            self.exps = torch.empty_like(self.logits)

    def after_gemm(self, tile: torch.Tensor, row_start: int, column_start: int, diagonal: bool) -> None:
        rows = slice(row_start, row_start + tile.shape[0])
        columns = slice(column_start, column_start + tile.shape[1])
        if self.native_kernel is not None:
            candidates = self._native_statistics(tile, rows, columns, diagonal)
        else:
            candidates = self._torch_statistics(tile, rows, columns, diagonal)
        if self.partial.values is None or candidates is None:  # no neighbours, or merged already
            return
        row_max, row_arg, column_max, column_arg = candidates
        self._merge(rows, tile, column_start, row_max, row_arg)
        if not diagonal:
            self._merge(columns, tile.T, row_start, column_max, column_arg)

    def _native_statistics(self, tile, rows: slice, columns: slice, diagonal: bool):
        """One kernel call; for k = 1 it merges the running top-1 itself (returns None then)."""
        g, p = self.geometry, self.partial
        r, c = tile.shape
        row_out = (p.exp_sum[rows], p.exp_dot[rows], self.maxima[0, :r])
        column_out = None if diagonal else (p.exp_sum[columns], p.exp_dot[columns], self.maxima[1, :c])
        best = None
        if p.k == 1:
            best = (p.values[rows], p.indices[rows], None if diagonal else p.values[columns],
                    None if diagonal else p.indices[columns])
        self.native_kernel.statistics(tile, g.scale, g.shift, diagonal, g.unit, columns.start, rows.start,
                                      row_out, column_out, best, self.scratch)
        if best is not None:
            return None
        return self.maxima[0, :r], None, self.maxima[1, :c], None

    def _torch_statistics(self, tile, rows: slice, columns: slice, diagonal: bool):
        """s, t (fixed point) into the partial; returns the maxima (and first arguments, global
        indices, where they come for free: CUDA and Triton; None otherwise)."""
        g, p = self.geometry, self.partial
        if self.triton_statistics is not None:
            stats = self.triton_statistics(tile, g.scale, g.shift, diagonal, not diagonal)
        else:
            stats = _torch_tile_statistics(tile, g.scale, g.shift, diagonal, self.logits, self.exps,
                                           with_arguments=self.sync_free)
        row_sum, row_dot, row_max, row_arg, column_sum, column_dot, column_max, column_arg = stats
        p.exp_sum[rows] += _to_fixed(row_sum, g.unit)
        p.exp_dot[rows] += _to_fixed(row_dot, g.unit)
        if not diagonal:
            p.exp_sum[columns] += _to_fixed(column_sum, g.unit)
            p.exp_dot[columns] += _to_fixed(column_dot, g.unit)
        if diagonal and self.triton_statistics is not None:
            tile.diagonal().fill_(-math.inf)  # for the index search of k > 1: self is never a neighbour
        return (row_max, None if row_arg is None else row_arg + columns.start,
                column_max, None if column_arg is None else column_arg + rows.start)

    def _merge(self, rows: slice, candidates: torch.Tensor, base: int, tile_max: torch.Tensor,
               tile_arg: torch.Tensor | None) -> None:
        """Merge one tile's candidates (R, C) (column c is global row base + c) into rows ``rows``.

        tile_max (R,): each row's largest candidate; tile_arg (R,): its first (lowest) global
        index, or None to search it here.
        """
        p = self.partial
        if p.k == 1 and tile_arg is not None:
            p.merge_candidates_(rows, tile_max.unsqueeze(1), tile_arg.unsqueeze(1))
            return
        if self.sync_free:
            top_values, top_columns = topk_by_key(candidates, min(p.k, candidates.shape[1]))
            p.merge_candidates_(rows, top_values, top_columns + base)
            return
        # A row can only change if its tile maximum reaches its current k-th best value; only
        # those (after the first few tiles, few) rows pay for the index search. ">=" keeps equal
        # values for the lower-index rule of the merge.
        improving = torch.nonzero(tile_max >= p.values[rows, -1]).flatten()
        if improving.numel() == 0:
            return
        global_rows = improving + rows.start
        chosen = candidates.index_select(0, improving)
        if p.k == 1:
            values, columns = tile_max[improving].unsqueeze(1), torch.argmax(chosen, dim=1, keepdim=True)
        else:
            values, columns = topk_lower_index(chosen, min(p.k, chosen.shape[1]))
        best_values, best_indices = p.values.index_select(0, global_rows), p.indices.index_select(0, global_rows)
        merge_best_(best_values, best_indices, values, columns + base)
        p.values.index_copy_(0, global_rows, best_values)
        p.indices.index_copy_(0, global_rows, best_indices)


def _torch_tile_statistics(tile: torch.Tensor, scale: float, shift: float, diagonal: bool,
                           logits_buffer: torch.Tensor, exps_buffer: torch.Tensor, with_arguments: bool):
    """The tile statistics with torch ops (float32): row and (off the diagonal) column sums of 2^y
    and 2^y y, and the maxima of the tile without its self entries.

    Returns (row_sum, row_dot, row_max, row_arg, column_sum, column_dot, column_max, column_arg),
    (R,) or (C,) each; arguments are local (first maximal index) when ``with_arguments``, else
    None (and the column entries are None on the diagonal).
    """
    r, c = tile.shape
    logits, exps = logits_buffer[:r, :c], exps_buffer[:r, :c]
    torch.mul(tile, scale, out=logits)
    logits.sub_(shift)
    if diagonal:
        tile.diagonal().fill_(-math.inf)  # self counts in the sums (from the logits), never as a neighbour
    torch.exp2(logits, out=exps)
    columns = not diagonal
    row_sum, column_sum = exps.sum(dim=1), exps.sum(dim=0) if columns else None
    exps.mul_(logits)  # e * y in place of e (no longer needed)
    row_dot, column_dot = exps.sum(dim=1), exps.sum(dim=0) if columns else None
    row_arg = column_arg = column_max = None
    if with_arguments:  # max(dim) returns the first maximal index
        row_max, row_arg = torch.max(tile, dim=1)
        if columns:
            column_max, column_arg = torch.max(tile, dim=0)
    else:
        row_max = torch.amax(tile, dim=1)
        if columns:
            column_max = torch.amax(tile, dim=0)
    return row_sum, row_dot, row_max, row_arg, column_sum, column_dot, column_max, column_arg


def _to_fixed(values: torch.Tensor, unit: float) -> torch.Tensor:
    """float32 partial sums -> int64 counts of 1 / unit (round half to even, as llrint)."""
    return torch.round(values.double() * unit).to(torch.int64)


class _TileWorkerPool:
    """Hands tasks to the tile workers and reports progress from the calling thread.

    One worker runs in the calling thread (CUDA, or a single CPU thread). Several run in threads
    that pull tasks from a shared queue (torch ops and the native kernel release the GIL), each
    with single-threaded intra-op parallelism: no per-op barriers, which stall multi-threaded
    ops whenever a core is taken by another process. Each worker has its own statistics, so no two threads write the
    same row.
    """

    def __init__(self, total_tiles: int, progress: Progress | None):
        self.total_tiles, self.progress = total_tiles, progress
        self.done_tiles = 0

    def run(self, tasks: list[_Task], workers: list) -> None:
        if len(workers) == 1:
            for task in tasks:
                self.done_tiles += workers[0].run(task)
                self._report()
            return
        pending = queue.SimpleQueue()
        for task in tasks:
            pending.put(task)
        cancelled = threading.Event()
        lock = threading.Lock()
        failures: list[BaseException] = []

        def drain(worker) -> None:
            try:
                while not cancelled.is_set():
                    try:
                        task = pending.get_nowait()
                    except queue.Empty:
                        return
                    tiles = worker.run(task)
                    with lock:
                        self.done_tiles += tiles
            except BaseException as error:  # surfaced in the calling thread below
                failures.append(error)
                cancelled.set()

        threads = [threading.Thread(target=drain, args=(worker,), daemon=True) for worker in workers]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.25)
                    self._report()
        except BaseException:
            cancelled.set()  # stop handing out tasks; running tiles finish within milliseconds
            for thread in threads:
                thread.join()
            raise
        if failures:
            raise failures[0]
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done_tiles, self.total_tiles)


def _tile_statistics_kernel(tile_kernel: str, device: torch.device):
    """(name, native kernel or None, Triton statistics function or None) for ``tile_kernel``."""
    if tile_kernel not in TILE_KERNELS:
        raise InvalidParameterError(f"tile kernel must be one of {', '.join(TILE_KERNELS)}, got {tile_kernel!r}")
    if tile_kernel == "torch" or (tile_kernel == "auto" and device.type == "cuda"):
        return "torch", None, None
    if tile_kernel in ("auto", "native"):
        if device.type == "cuda":
            raise InvalidParameterError("tile kernel native runs on CPU; on CUDA use triton or torch")
        from .native import load

        kernel = load()
        if kernel is not None:
            return "native", kernel, None
        if tile_kernel == "native":
            raise BackendUnavailableError(
                "tile kernel native needs a C++ compiler (c++, g++ or clang++; or set CXX); or use tile kernel torch"
            )
        return "torch", None, None
    try:
        from .triton_tile import tile_statistics
    except ImportError as error:
        raise BackendUnavailableError(f"tile kernel triton needs the triton package ({error})") from None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InvalidParameterError("tile kernel triton runs on CUDA (or under TRITON_INTERPRET=1 for tests)")
    return "triton", None, tile_statistics


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """Temporarily set torch's intra-op thread count (new threads inherit it on first use)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _gemm(queries: torch.Tensor, database: torch.Tensor, matmul_precision: str, out: torch.Tensor) -> None:
    """out (B, B) = queries @ database.T: the raw float32 dot products."""
    if matmul_precision == "bf16":
        # bf16 inputs with float32 accumulation and output (CUDA's mm out_dtype).
        out.copy_(torch.mm(queries.bfloat16(), database.bfloat16().T, out_dtype=torch.float32))
        return
    torch.mm(queries, database.T, out=out)


@contextlib.contextmanager
def _cuda_matmul_precision(device: torch.device, matmul_precision: str):
    """Pin CUDA float32 GEMMs to IEEE fp32 (default) or allow TF32, restoring the setting after."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = matmul_precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _check_self_terms(norms: torch.Tensor, scale: float, max_squared: float, n: int, tau: float) -> None:
    """The smallest self term 2^y_ii must stay far above the fixed-point resolution of the sums.

    y_ii = scale (|m_i|^2 - max |m|^2) <= 0; it is ~0 for normalised rows, and only a tiny tau
    with rows normalised loosely could push it below 2^-(fraction bits - 24), where the row's
    sum would lose float32 precision.
    """
    lowest = scale * (float(norms.min()) ** 2 - max_squared)
    limit = -(fraction_bits(n) - 24)
    if lowest < limit:
        smallest_tau = tau * lowest / limit
        raise InvalidParameterError(
            f"tau = {tau:g} is too small for these rows: with norms between {float(norms.min()):.6f} and "
            f"{math.sqrt(max_squared):.6f} a row's self term underflows; use tau >= {smallest_tau:.3g} or "
            f"normalise the rows more tightly"
        )


def _check_pass_arguments(n: int, k: int, tau: float, matmul_precision: str, device: torch.device) -> None:
    if n < 2:
        raise InvalidParameterError(f"need at least 2 feature rows to find neighbours, got N = {n}")
    # k = 0 is the entropy-only pass a FAISS backend runs beside its own k-NN; users ask for k >= 1
    # (checked by knn_entropy and rebuild).
    check_k(k, n, allow_entropy_only=True)
    check_tau(tau)
    if matmul_precision not in MATMUL_PRECISIONS:
        raise InvalidParameterError(
            f"matmul precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {matmul_precision!r}"
        )
    if matmul_precision != "fp32" and device.type != "cuda":
        raise InvalidParameterError(
            f"matmul precision {matmul_precision} is for CUDA only; the CPU pass is always fp32"
        )

"""One blocked pass over the N x N similarities: top-k neighbours and the entropy of every row.

For memory-bank rows m_i (N, d), L2-normalised, and temperature tau:

    z_ij = m_i . m_j / tau                      logits of the non-parametric softmax (Eq 2)
    p_ij = softmax_j(z_ij)                      over ALL N rows, self included
    H_i  = -sum_j p_ij log p_ij                 entropy (Eq 5), queried with m_i itself
    N_k(i) = the k largest m_i . m_j, j != i    neighbours (Eq 1), ties -> lower j

Why no running max (the usual online softmax): a numerically safe softmax subtracts the row
maximum before exp, and a streaming one keeps a running maximum and rescales its partial sums
whenever the maximum grows. Here the maximum is known before the pass starts. By
Cauchy-Schwarz, z_ij <= |m_i| max_j |m_j| / tau =: c_i, so with the fixed shift

    y_ij = z_ij - c_i <= 0          exp(y_ij) <= 1 never overflows,

and the self term y_ii = |m_i| (|m_i| - max_j |m_j|) / tau is ~0 for normalised rows (within
2e-3 / tau of 0 at the validated norm tolerance), so the row sum is >= ~1 and never underflows.
The entropy is shift-invariant and exact from two sums,

    s_i = sum_j exp(y_ij),   t_i = sum_j exp(y_ij) y_ij,   H_i = log s_i - t_i / s_i,

which are accumulated in float64 across blocks (each block's partial sum is a float32
reduction over at most ``db_rows`` terms). No rescaling, no second pass, no N x N matrix.
Rows that are not normalised would break the self-term argument, so they are rejected by
``features.scan_row_norms`` instead of silently losing precision.

Cost per (B, C) tile: one GEMM (``torch.addmm`` folds the 1/tau scale and the -c_i shift in),
one exp, two row reductions (s, and t after e*y in place) and the top-k update. The exp is taken
in base 2 (``exp2`` is ~3x faster than ``exp`` on CPU): y is computed in units of log2, i.e.
scaled by log2(e), and converted back once per row at the end.

CPU: each worker thread (one per core) runs whole query blocks with single-threaded torch ops;
the top-k update first takes ``amax`` (~20x cheaper than a max that also returns indices) and
runs the index search (argmax/topk) only on rows whose tile maximum reaches their running k-th
best, which after the first few database blocks is a small fraction of the rows.

CUDA: one stream, no host synchronisation in the loop (no ``.any()``, no ``nonzero``): every
tile runs a branch-free merge, and a Triton kernel (``triton_tile.py``) computes s, t and the
top-1 from a single read of the tile, because on a GPU the elementwise passes cost more than
the GEMM.

Every GEMM has the same (B, C) shape (ragged blocks are zero-padded) so that identical rows get
bit-identical dot products wherever they sit, which the lower-index tie rule relies on.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import BackendUnavailableError, InvalidParameterError
from .features import DEFAULT_NORM_TOLERANCE, FeatureSource, scan_row_norms
from .topk import merge_top1, merge_topk, top1_lower_index, topk_by_key, topk_lower_index

LOG2_E = 1.0 / math.log(2.0)
LN_2 = math.log(2.0)

MATMUL_PRECISIONS = ("fp32", "tf32", "bf16")

# progress(done_tiles, total_tiles); may raise RebuildCancelled to abandon the pass.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BlockSizes:
    """Tile shape of the pass: ``query_rows`` x ``db_rows`` logits at a time."""

    query_rows: int
    db_rows: int


# CPU: measured on 2 shared AMD EPYC cores (L2 1 MiB/core, L3 32 MiB), N = 16k..33k, d = 128,
# one worker thread per core: 1024 x 1024 and 512 x 1024 tiles (4 / 2 MiB per buffer) were the
# fastest (about FAISS's time); 512 x 2048 was ~10% slower, 2048 x 1024 ~30% slower.
CPU_BLOCKS = BlockSizes(query_rows=1024, db_rows=1024)
# CUDA: large tiles keep the GEMM efficient and amortise launch overhead (1 GiB per buffer).
CUDA_BLOCKS = BlockSizes(query_rows=8192, db_rows=32768)


def default_block_sizes(device: torch.device) -> BlockSizes:
    return CUDA_BLOCKS if device.type == "cuda" else CPU_BLOCKS


@dataclass
class PassResult:
    """Output of :func:`knn_entropy_pass`, all on CPU.

    neighbours: (N, k) int64 or None when k == 0; similarities: (N, k) float32 or None;
    entropy: (N,) float32.
    """

    neighbours: torch.Tensor | None
    similarities: torch.Tensor | None
    entropy: torch.Tensor
    seconds: float


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
) -> PassResult:
    """Top-k neighbours (self excluded) and entropy (self included) of every row, one pass.

    source: the (N, d) rows, whole or in chunks (``features.open_features``).
    k: neighbours per row, 0 for the entropy alone (the FAISS backends); 0 <= k < N.
    matmul_precision: "fp32" (exact, default); "tf32" or "bf16" (CUDA only, faster GEMM with
    reduced input precision; measure with ``nbr-index bench --device cuda`` before using).
    workers: CPU threads, each running whole query blocks with single-threaded torch ops
    (default: torch.get_num_threads()); CUDA always uses one.
    tile_kernel: "triton" reads each tile once for all row statistics (``triton_tile.py``);
    "torch" runs them as separate torch ops; "auto" = torch for now: the Triton kernel is
    checked only under Triton's CPU interpreter so far, so it stays opt-in until a GPU run
    (tests/test_nbr_cuda.py) has confirmed it.
    progress: called as progress(done_tiles, total_tiles) from the calling thread; it may raise
    (e.g. RebuildCancelled) to abandon the pass.
    """
    started = time.perf_counter()
    n, device = source.n, source.device
    _check_pass_arguments(n, k, tau, matmul_precision, device)
    blocks = block_sizes or default_block_sizes(device)
    # No tile larger than the data (or a super-block): padding then wastes nothing when N is small.
    blocks = BlockSizes(min(blocks.query_rows, source.read_rows), min(blocks.db_rows, source.read_rows))
    tile_statistics = _tile_statistics_kernel(tile_kernel, device)
    workers = 1 if device.type == "cuda" else max(1, workers or torch.get_num_threads())

    norms = scan_row_norms(source, norm_tolerance)  # (N,) float64, validates every row
    scale = LOG2_E / tau
    # shift_i = c_i * log2(e), the Cauchy-Schwarz bound in the base-2 units of the tiles.
    shift = (norms * norms.max() * scale).to(torch.float32)
    totals = _RowTotals(
        neg_shift=(-shift).unsqueeze(1),  # (N, 1): addmm broadcasts it along the row
        exp_sum=torch.zeros(n, dtype=torch.float64, device=device),  # s_i
        exp_dot=torch.zeros(n, dtype=torch.float64, device=device),  # t_i, base-2 units
        best=_RunningTopK(n, k, device) if k > 0 else None,
    )
    tile_workers = [
        _TileWorker(totals, blocks, scale, matmul_precision, device, tile_statistics) for _ in range(workers)
    ]
    schedule = _Schedule(total_tiles=_count_tiles(n, source.read_rows, blocks), progress=progress)

    super_rows = source.read_rows
    with _cuda_matmul_precision(device, matmul_precision), _intra_op_threads(1 if workers > 1 else None):
        for q_start in range(0, n, super_rows):
            q_stop = min(q_start + super_rows, n)
            queries = source.read(q_start, q_stop)
            for d_start in range(0, n, super_rows):
                d_stop = min(d_start + super_rows, n)
                database = queries if d_start == q_start else source.read(d_start, d_stop)
                query_blocks = [
                    _QueryBlock(queries, q_start, b_start, min(b_start + blocks.query_rows, q_stop), database, d_start)
                    for b_start in range(q_start, q_stop, blocks.query_rows)
                ]
                schedule.run(query_blocks, tile_workers)

    exp_sum, exp_dot = totals.exp_sum, totals.exp_dot
    # H = ln s - (sum e y_nats) / s with y_nats = y * ln 2.
    entropy = (torch.log(exp_sum) - LN_2 * exp_dot / exp_sum).to(torch.float32).cpu()
    neighbours = similarities = None
    if totals.best is not None:
        neighbours = totals.best.indices.cpu()
        # Undo the tile transform: m_i . m_j = (y_ij + shift_i) / scale.
        similarities = ((totals.best.values.double() + shift.double().unsqueeze(1)) / scale).float().cpu()
    return PassResult(neighbours, similarities, entropy, time.perf_counter() - started)


@dataclass
class _RowTotals:
    """Per-row state of the pass; workers write disjoint row ranges, so no locking."""

    neg_shift: torch.Tensor  # (N, 1) float32
    exp_sum: torch.Tensor  # (N,) float64
    exp_dot: torch.Tensor  # (N,) float64
    best: "_RunningTopK | None"


@dataclass
class _QueryBlock:
    """Rows b_start:b_stop of the query super-block against a whole database super-block."""

    queries: torch.Tensor  # (super rows, d), starting at global row q_start
    q_start: int
    b_start: int
    b_stop: int
    database: torch.Tensor  # (super rows, d), starting at global row d_start
    d_start: int


class _TileWorker:
    """Runs query blocks tile by tile into preallocated (B, C) logits and exp buffers.

    Every GEMM has the full (B, C) shape: a ragged last block is zero-padded. BLAS libraries pick
    different kernels for different shapes, and those round differently, so without padding two
    identical database rows, one in a full tile and one in the ragged tile, could get dot products
    one ulp apart and the lower-index tie rule would fail on exact duplicates.
    """

    def __init__(self, totals: _RowTotals, blocks: BlockSizes, scale: float, matmul_precision: str, device,
                 tile_statistics=None):
        self.totals, self.blocks, self.scale, self.matmul_precision = totals, blocks, scale, matmul_precision
        self.tile_statistics = tile_statistics
        self.logits_buffer = torch.empty((blocks.query_rows, blocks.db_rows), dtype=torch.float32, device=device)
        # The Triton path reads the logits once and needs no second tile buffer.
        self.exp_buffer = torch.empty_like(self.logits_buffer) if tile_statistics is None else None
        self.padded_queries: torch.Tensor | None = None
        self.padded_database: torch.Tensor | None = None
        self.padded_shift = torch.zeros((blocks.query_rows, 1), dtype=torch.float32, device=device)

    def run(self, block: _QueryBlock) -> int:
        """Process one query block against its database super-block; returns tiles done."""
        totals = self.totals
        rows = slice(block.b_start, block.b_stop)
        query_rows, neg_shift = self._full_query_block(
            block.queries[block.b_start - block.q_start : block.b_stop - block.q_start], totals.neg_shift[rows]
        )
        d_stop = block.d_start + block.database.shape[0]
        tiles = 0
        for c_start in range(block.d_start, d_stop, self.blocks.db_rows):
            c_stop = min(c_start + self.blocks.db_rows, d_stop)
            database = self._full_database_block(block.database[c_start - block.d_start : c_stop - block.d_start])
            _shifted_logits(query_rows, database, neg_shift, self.scale, self.matmul_precision, out=self.logits_buffer)
            shape = (block.b_stop - block.b_start, c_stop - c_start)
            logits = self.logits_buffer[: shape[0], : shape[1]]
            if self.tile_statistics is not None:
                self._one_read_statistics(logits, rows, block.b_start, c_start)
            else:
                exps = self.exp_buffer[: shape[0], : shape[1]]
                torch.exp2(logits, out=exps)
                totals.exp_sum[rows] += exps.sum(dim=1)
                # e * y in place of e (no longer needed): ~2x faster than vecdot, which allocates.
                totals.exp_dot[rows] += torch.mul(exps, logits, out=exps).sum(dim=1)
                if totals.best is not None:
                    # The self entry is in the entropy (above) but never a neighbour.
                    logits.diagonal(offset=block.b_start - c_start).fill_(-math.inf)
                    totals.best.update(block.b_start, c_start, logits)
            tiles += 1
        return tiles

    def _full_query_block(self, queries: torch.Tensor, neg_shift: torch.Tensor):
        """(B, d) queries and (B, 1) shifts: views when full, zero-padded copies when ragged."""
        rows = queries.shape[0]
        if rows == self.blocks.query_rows:
            return queries, neg_shift
        if self.padded_queries is None:
            self.padded_queries = queries.new_zeros((self.blocks.query_rows, queries.shape[1]))
        self.padded_queries[:rows] = queries
        self.padded_queries[rows:] = 0
        self.padded_shift[:rows] = neg_shift
        return self.padded_queries, self.padded_shift

    def _full_database_block(self, database: torch.Tensor) -> torch.Tensor:
        """(C, d) database rows: a view when full, a zero-padded copy when ragged."""
        rows = database.shape[0]
        if rows == self.blocks.db_rows:
            return database
        if self.padded_database is None:
            self.padded_database = database.new_zeros((self.blocks.db_rows, database.shape[1]))
        self.padded_database[:rows] = database
        self.padded_database[rows:] = 0
        return self.padded_database

    def _one_read_statistics(self, logits: torch.Tensor, rows: slice, b_start: int, c_start: int) -> None:
        """The Triton path: s, t and the top-1 of every row from a single read of the tile."""
        totals = self.totals
        exp_sum, exp_dot, top_value, top_column = self.tile_statistics(logits, b_start - c_start)
        totals.exp_sum[rows] += exp_sum
        totals.exp_dot[rows] += exp_dot
        best = totals.best
        if best is None:
            return
        if best.k == 1:
            merge_top1(best.values[rows, 0], best.indices[rows, 0], top_value, top_column + c_start)
        else:
            logits.diagonal(offset=b_start - c_start).fill_(-math.inf)
            best.update(b_start, c_start, logits)


class _Schedule:
    """Hands query blocks to the tile workers and reports progress from the calling thread.

    One worker runs in the calling thread (CUDA, or a single CPU thread). Several run in threads
    that pull blocks from a shared queue (torch ops release the GIL), each with single-threaded
    intra-op parallelism: on a shared 2-core machine that was ~2x faster than one thread driving
    2-thread OpenMP ops, whose per-op barriers stall whenever a core is taken by another process.
    """

    def __init__(self, total_tiles: int, progress: Progress | None):
        self.total_tiles, self.progress = total_tiles, progress
        self.done_tiles = 0

    def run(self, blocks: list[_QueryBlock], workers: list[_TileWorker]) -> None:
        if len(workers) == 1:
            for block in blocks:
                self.done_tiles += workers[0].run(block)
                self._report()
            return
        pending = queue.SimpleQueue()
        for block in blocks:
            pending.put(block)
        cancelled = threading.Event()
        lock = threading.Lock()
        failures: list[BaseException] = []

        def drain(worker: _TileWorker) -> None:
            try:
                while not cancelled.is_set():
                    try:
                        block = pending.get_nowait()
                    except queue.Empty:
                        return
                    tiles = worker.run(block)
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
            cancelled.set()  # stop handing out blocks; running tiles finish within milliseconds
            for thread in threads:
                thread.join()
            raise
        if failures:
            raise failures[0]
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done_tiles, self.total_tiles)


TILE_KERNELS = ("auto", "triton", "torch")


def _tile_statistics_kernel(tile_kernel: str, device: torch.device):
    """The Triton tile-statistics function, or None for the torch-ops path."""
    if tile_kernel not in TILE_KERNELS:
        raise InvalidParameterError(f"tile kernel must be one of {', '.join(TILE_KERNELS)}, got {tile_kernel!r}")
    if tile_kernel in ("torch", "auto"):
        return None
    try:
        from .triton_tile import tile_statistics
    except ImportError as error:
        raise BackendUnavailableError(f"tile kernel triton needs the triton package ({error})") from None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InvalidParameterError("tile kernel triton runs on CUDA (or under TRITON_INTERPRET=1 for tests)")
    return tile_statistics


@contextlib.contextmanager
def _intra_op_threads(threads: int | None):
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


class _RunningTopK:
    """Per-row best k (value, index) over the database tiles seen so far.

    values (N, k) float32 in tile units, best first; indices (N, k) int64 global rows.
    """

    def __init__(self, n: int, k: int, device: torch.device):
        self.k = k
        self.values = torch.full((n, k), -math.inf, dtype=torch.float32, device=device)
        # Sentinel n: any real candidate with an equal (-inf) value has a lower index and wins.
        self.indices = torch.full((n, k), n, dtype=torch.int64, device=device)
        self.sync_free = device.type == "cuda"

    def update(self, row_start: int, column_start: int, logits: torch.Tensor) -> None:
        """Merge the candidates of one (B, C) tile of rows row_start.. and columns column_start..."""
        rows = slice(row_start, row_start + logits.shape[0])
        if self.sync_free:
            self._merge_all_rows(rows, column_start, logits)
        else:
            self._merge_improving_rows(rows, column_start, logits)

    def _merge_all_rows(self, rows: slice, column_start: int, logits: torch.Tensor) -> None:
        values, indices = self.values[rows], self.indices[rows]
        if self.k == 1:
            tile_values, tile_columns = top1_lower_index(logits)
            merge_top1(values[:, 0], indices[:, 0], tile_values, tile_columns + column_start)
            return
        k_tile = min(self.k, logits.shape[1])
        tile_values, tile_columns = topk_by_key(logits, k_tile)
        merged_values, merged_indices = merge_topk(values, indices, tile_values, tile_columns + column_start)
        values.copy_(merged_values)
        indices.copy_(merged_indices)

    def _merge_improving_rows(self, rows: slice, column_start: int, logits: torch.Tensor) -> None:
        # A row can only change if the tile's maximum reaches its current k-th best value.
        # amax is a cheap vectorised reduction; only the (few) rows that pass it pay for the
        # index search. ">=" keeps equal values for the lower-index rule in the merge.
        tile_max = torch.amax(logits, dim=1)
        improving = torch.nonzero(tile_max >= self.values[rows, -1]).flatten()
        if improving.numel() == 0:
            return
        global_rows = improving + rows.start
        candidates = logits.index_select(0, improving)
        values = self.values.index_select(0, global_rows)
        indices = self.indices.index_select(0, global_rows)
        if self.k == 1:
            tile_columns = torch.argmax(candidates, dim=1)  # first maximal column
            merge_top1(values[:, 0], indices[:, 0], tile_max[improving], tile_columns + column_start)
        else:
            k_tile = min(self.k, candidates.shape[1])
            tile_values, tile_columns = topk_lower_index(candidates, k_tile)
            values, indices = merge_topk(values, indices, tile_values, tile_columns + column_start)
        self.values.index_copy_(0, global_rows, values)
        self.indices.index_copy_(0, global_rows, indices)


def _shifted_logits(
    queries: torch.Tensor,
    database: torch.Tensor,
    neg_shift: torch.Tensor,
    scale: float,
    matmul_precision: str,
    out: torch.Tensor,
) -> None:
    """out (B, C) = scale * queries @ database.T - shift, one GEMM with the shift folded in."""
    if matmul_precision == "bf16":
        # bf16 inputs with float32 accumulation and output (CUDA's mm out_dtype), then the affine.
        product = torch.mm(queries.bfloat16(), database.bfloat16().T, out_dtype=torch.float32)
        torch.add(neg_shift, product, alpha=scale, out=out)
        return
    torch.addmm(neg_shift, queries, database.T, alpha=scale, out=out)


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


def _count_tiles(n: int, super_rows: int, blocks: BlockSizes) -> int:
    """Number of (query block, database block) tiles the pass visits."""
    per_super = [min(super_rows, n - start) for start in range(0, n, super_rows)]
    query_blocks = sum(math.ceil(rows / blocks.query_rows) for rows in per_super)
    db_blocks = sum(math.ceil(rows / blocks.db_rows) for rows in per_super)
    return query_blocks * db_blocks


def _check_pass_arguments(n: int, k: int, tau: float, matmul_precision: str, device: torch.device) -> None:
    if n < 2:
        raise InvalidParameterError(f"need at least 2 feature rows to find neighbours, got N = {n}")
    if not 0 <= k < n:
        raise InvalidParameterError(f"k must satisfy 1 <= k < N = {n} (self is excluded), got k = {k}")
    if not (tau > 0 and math.isfinite(tau)):
        raise InvalidParameterError(f"tau must be a positive temperature, got {tau}")
    if matmul_precision not in MATMUL_PRECISIONS:
        raise InvalidParameterError(
            f"matmul precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {matmul_precision!r}"
        )
    if matmul_precision != "fp32" and device.type != "cuda":
        raise InvalidParameterError(
            f"matmul precision {matmul_precision} is for CUDA only; the CPU pass is always fp32"
        )

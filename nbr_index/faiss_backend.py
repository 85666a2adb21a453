"""k-NN with FAISS: exact IndexFlatIP (CPU, or GPU with faiss-gpu) and approximate IVF-Flat.

FAISS gives the neighbours only; the entropy still comes from the blocked pass (``fused.py``
with k = 0). Two things differ from what the index needs and are handled here:

- Self exclusion: each query asks for k + 1 + TIE_MARGIN neighbours and drops itself.
- Tie order: FAISS orders equal similarities by *higher* id first and may cut a group of equal
  values anywhere. Every returned list is re-ordered by (similarity desc, id asc). A row's k-th
  value v_k is provably right when every searched database block's last returned value is
  below v_k (all values >= v_k were then returned); rows where a block's last value equals v_k
  (an exact tie cut by the list length) are recomputed exactly by :func:`exact_knn_of_rows`.

Shapes: neighbours (N, k) int64, similarities (N, k) float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .blocks import row_blocks
from .errors import BackendUnavailableError, InvalidParameterError
from .features import FeatureSource
from .fused import Progress
from .topk import merge_topk, order_best_first, topk_lower_index

# Extra neighbours asked per query so that a short run of ties rarely forces a recomputation.
TIE_MARGIN = 2
# Queries per FAISS search call: bounds the result buffers and gives progress a heartbeat.
SEARCH_ROWS = 16384
# Tile of the exact search for selected rows (tie repair, IVF recall): 1024 x 8192 x 4 B = 32 MiB.
EXACT_QUERY_ROWS, EXACT_DB_ROWS = 1024, 8192


def import_faiss():
    """The faiss module, or BackendUnavailableError with the install command."""
    try:
        import faiss
    except ImportError as error:  # FAISS is an optional extra: the torch backend needs none
        raise BackendUnavailableError(
            f"backend faiss needs the faiss package ({error}), an optional extra: pip install faiss-cpu "
            f"(= pip install 'and-nbr[cpu]'; 'and-nbr[gpu]' for faiss-gpu on CUDA), or use --backend torch"
        ) from None
    return faiss


def faiss_gpu_device(device: torch.device) -> int:
    """The CUDA device index FAISS runs on for ``device`` ("cuda" alone: torch's current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def faiss_gpu_available() -> bool:
    try:
        faiss = import_faiss()
    except BackendUnavailableError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class FaissKnn:
    """neighbours (N, k) int64, similarities (N, k) float32; recall@k on a query sample (IVF)."""

    neighbours: np.ndarray
    similarities: np.ndarray
    recall: float | None = None
    recomputed_rows: int = 0


def flat_knn(source: FeatureSource, k: int, gpu: int | None = None, progress: Progress | None = None) -> FaissKnn:
    """Exact k-NN with IndexFlatIP, one database super-block at a time (memory O(block)).

    gpu: the CUDA device index to search on (faiss-gpu), None for CPU.
    """
    faiss = import_faiss()
    resources = _gpu_resources(faiss) if gpu is not None else None
    n = source.n
    wanted = k + 1 + TIE_MARGIN
    best_values = torch.full((n, k), -math.inf)
    best_indices = torch.full((n, k), n, dtype=torch.int64)
    # Highest "last returned value" over the database blocks, per row (see module docstring).
    cut_value = torch.full((n,), -math.inf)
    super_rows = source.read_rows
    blocks = math.ceil(n / super_rows)
    for block_number, (d_start, d_stop) in enumerate(row_blocks(n, super_rows)):
        database = _as_numpy(source.read(d_start, d_stop))
        index = faiss.IndexFlatIP(source.dim)
        if resources is not None:
            index = faiss.index_cpu_to_gpu(resources, gpu, index)
        index.add(database)
        asked = min(wanted, d_stop - d_start)
        for q_start, q_stop in row_blocks(n, super_rows):
            queries = database if q_start == d_start else _as_numpy(source.read(q_start, q_stop))
            for s_start, s_stop in row_blocks(q_stop, SEARCH_ROWS, start=q_start):
                values, ids = index.search(queries[s_start - q_start : s_stop - q_start], asked)
                values, ids = torch.from_numpy(values), torch.from_numpy(ids).to(torch.int64) + d_start
                rows = slice(s_start, s_stop)
                if asked == d_stop - d_start:
                    last = torch.full((s_stop - s_start,), -math.inf)  # the whole block was returned
                else:
                    last = values[:, -1]
                cut_value[rows] = torch.maximum(cut_value[rows], last)
                values = _drop_self(values, ids, torch.arange(s_start, s_stop))
                best_values[rows], best_indices[rows] = merge_topk(
                    best_values[rows], best_indices[rows], *order_best_first(values, ids)
                )
                if progress is not None:
                    progress(block_number * n + s_stop, blocks * n)
        del index

    cut_rows = torch.nonzero(cut_value >= best_values[:, -1]).flatten()
    if cut_rows.numel() > 0:
        exact_values, exact_indices = exact_knn_of_rows(source, cut_rows, k)
        best_values[cut_rows], best_indices[cut_rows] = exact_values, exact_indices
    return FaissKnn(best_indices.numpy(), best_values.numpy(), recomputed_rows=int(cut_rows.numel()))


def ivf_knn(
    source: FeatureSource,
    k: int,
    nlist: int | None = None,
    nprobe: int = 32,
    recall_sample: int = 1000,
    gpu: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> FaissKnn:
    """Approximate k-NN with IndexIVFFlat (inner product), for N in the tens of millions.

    nlist: inverted lists, default ~4 sqrt(N); nprobe: lists visited per query; gpu: the CUDA
    device index to search on (faiss-gpu), None for CPU. The index holds
    all N vectors (N d 4 bytes), added one super-block at a time. recall@k against exact search
    is measured on ``recall_sample`` random rows and returned in ``FaissKnn.recall``.
    """
    faiss = import_faiss()
    n, dim = source.n, source.dim
    nlist = nlist or default_nlist(n)
    if not 1 <= nlist <= n:
        raise InvalidParameterError(f"nlist must be in 1..N = {n}, got {nlist}")
    if nprobe < 1:
        raise InvalidParameterError(f"nprobe must be >= 1, got {nprobe}")
    generator = np.random.default_rng(seed)

    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    # FAISS's k-means wants at least 39 training points per list; 64 keeps training quick at
    # tens of millions of rows (256 per list is FAISS's cap) with little loss in list quality.
    training_rows = np.sort(generator.choice(n, size=min(n, 64 * nlist), replace=False))
    index.train(_gather_rows(source, training_rows))
    if gpu is not None:
        index = faiss.index_cpu_to_gpu(_gpu_resources(faiss), gpu, index)
    for start, stop in row_blocks(n, source.read_rows):
        index.add(_as_numpy(source.read(start, stop)))
    index.nprobe = min(nprobe, nlist)

    wanted = min(k + 1 + TIE_MARGIN, n)
    neighbours = np.empty((n, k), dtype=np.int64)
    similarities = np.empty((n, k), dtype=np.float32)
    for q_start, q_stop in row_blocks(n, source.read_rows):
        queries = _as_numpy(source.read(q_start, q_stop))
        for s_start, s_stop in row_blocks(q_stop, SEARCH_ROWS, start=q_start):
            values, ids = index.search(queries[s_start - q_start : s_stop - q_start], wanted)
            values, ids = torch.from_numpy(values), torch.from_numpy(ids).to(torch.int64)
            # IVF may return fewer than asked (id -1): those slots rank last.
            values = values.masked_fill(ids < 0, -math.inf)
            ids = torch.where(ids < 0, torch.full_like(ids, n), ids)
            values = _drop_self(values, ids, torch.arange(s_start, s_stop))
            values, ids = order_best_first(values, ids)
            neighbours[s_start:s_stop], similarities[s_start:s_stop] = ids[:, :k].numpy(), values[:, :k].numpy()
            if progress is not None:
                progress(s_stop, n)

    sample = np.sort(generator.choice(n, size=min(n, recall_sample), replace=False))
    _, exact = exact_knn_of_rows(source, torch.from_numpy(sample), k)
    recall = recall_at_k(neighbours[sample], exact.numpy())
    return FaissKnn(neighbours, similarities, recall=recall)


def default_nlist(n: int) -> int:
    """~4 sqrt(N) inverted lists, at least 1 and at most N / 39 (FAISS's k-means minimum)."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def recall_at_k(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact k neighbours that the approximate list contains.

    approximate, exact: (m, k) int64.
    """
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approximate, exact))
    return hits / exact.size


def exact_knn_of_rows(source: FeatureSource, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k (self excluded, ties -> lower index) for selected rows, streaming the database.

    rows: (m,) int64 sorted row numbers. Returns similarities (m, k) float32, neighbours (m, k).
    """
    queries = torch.from_numpy(_gather_rows(source, rows.numpy()))
    return exact_knn_of_vectors(source, queries, k, own_rows=rows)


def exact_knn_of_vectors(
    source: FeatureSource, queries: torch.Tensor, k: int, own_rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries`` (m, d) float32 among the source's N rows by dot product, ties ->
    lower index, streaming the database; needs k <= N (k < N with ``own_rows``).

    own_rows: (m,) int64, the source row each query is (excluded from its own list), or None for
    queries from outside the source. Returns similarities (m, k) float32, neighbours (m, k) int64.
    Works on (EXACT_QUERY_ROWS x EXACT_DB_ROWS) similarity tiles, every GEMM of that one shape
    (ragged blocks zero-padded) so that identical rows get identical similarities.
    """
    m, n = queries.shape[0], source.n
    best_values = torch.full((m, k), -math.inf)
    best_indices = torch.full((m, k), n, dtype=torch.int64)
    query_rows, db_rows = min(EXACT_QUERY_ROWS, m), min(EXACT_DB_ROWS, n)
    queries = _zero_padded(queries, math.ceil(m / query_rows) * query_rows)   # once, not per database tile
    for d_start, d_stop in row_blocks(n, source.read_rows):
        database = source.read(d_start, d_stop).cpu()
        for c_start in range(0, database.shape[0], db_rows):
            block = _zero_padded(database[c_start : c_start + db_rows], db_rows)
            columns_here = min(db_rows, database.shape[0] - c_start)
            first_column = d_start + c_start
            for q_start, q_stop in row_blocks(m, query_rows):
                similarity = (queries[q_start:q_start + query_rows] @ block.T)[: q_stop - q_start, :columns_here]
                if own_rows is not None:
                    own_here = own_rows[q_start:q_stop]
                    own = (own_here >= first_column) & (own_here < first_column + columns_here)
                    similarity[own.nonzero().flatten(), own_here[own] - first_column] = -math.inf
                values, columns = topk_lower_index(similarity, min(k, columns_here))
                best_values[q_start:q_stop], best_indices[q_start:q_stop] = merge_topk(
                    best_values[q_start:q_stop], best_indices[q_start:q_stop], values, columns + first_column
                )
    return best_values, best_indices


def _zero_padded(block: torch.Tensor, rows: int) -> torch.Tensor:
    if block.shape[0] == rows:
        return block
    return torch.cat([block, block.new_zeros((rows - block.shape[0], block.shape[1]))])


def _drop_self(values: torch.Tensor, ids: torch.Tensor, query_rows: torch.Tensor) -> torch.Tensor:
    """Set the value of each query's own id to -inf (it then ranks last and is cut)."""
    return values.masked_fill(ids == query_rows.unsqueeze(1), -math.inf)


def _gather_rows(source: FeatureSource, rows: np.ndarray) -> np.ndarray:
    """(len(rows), d) float32 of the sorted row numbers, reading each super-block once."""
    out = np.empty((len(rows), source.dim), dtype=np.float32)
    for start, stop in row_blocks(source.n, source.read_rows):
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            block = _as_numpy(source.read(start, stop))
            out[lo:hi] = block[rows[lo:hi] - start]
    return out


def _as_numpy(rows: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(rows.detach().cpu().numpy(), dtype=np.float32)


def require_faiss_gpu() -> None:
    """A one-line error unless FAISS can run on a GPU here (the faiss backends on cuda)."""
    if not faiss_gpu_available():
        raise BackendUnavailableError(
            "backend faiss on cuda needs faiss-gpu (pip install faiss-gpu-cu12); "
            "or use --backend torch (the fastest exact path on CUDA)"
        )


def _gpu_resources(faiss):
    require_faiss_gpu()
    return faiss.StandardGpuResources()

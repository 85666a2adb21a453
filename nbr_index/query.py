"""``nbr-index query``: the nearest training samples of a sample or of new feature vectors.

Exact: every query is compared with all N rows of a feature snapshot by the exact tile search the
index uses for FAISS's ties and IVF's recall (``faiss_backend.exact_knn_of_vectors``; torch only,
streamed in row chunks for snapshots larger than memory), neighbours ordered by cosine similarity,
ties -> lower index. A query by sample index excludes the sample itself, as the neighbourhoods of
a rebuild do (Eq 1); query vectors (e.g. ``trainer embed`` of new images) are L2-normalised first.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from storage import Store

from .errors import FeaturesNotReadyError, InvalidFeaturesError, InvalidParameterError
from .faiss_backend import exact_knn_of_rows, exact_knn_of_vectors
from .features import DEFAULT_IN_MEMORY_BYTES, open_features


@dataclass
class QueryResult:
    """neighbours (m, k) int64 and similarities (m, k) float32 of m queries, best first; labels
    (m, k) int64 of the neighbours and query_labels (m,) of indexed queries where the store has labels."""

    round: int
    k: int
    queries: list[str]                  # "index 12" or "vector 0", one per query
    neighbours: np.ndarray
    similarities: np.ndarray
    labels: np.ndarray | None
    query_labels: list[int | None]

    def to_json(self) -> dict:
        return {
            "round": self.round,
            "k": self.k,
            "queries": [
                {
                    "query": name,
                    "label": query_label,
                    "neighbours": self.neighbours[i].tolist(),
                    "similarities": [round(float(s), 6) for s in self.similarities[i]],
                    "labels": None if self.labels is None else self.labels[i].tolist(),
                }
                for i, (name, query_label) in enumerate(zip(self.queries, self.query_labels))
            ],
        }

    def format(self) -> str:
        lines = []
        for i, (name, query_label) in enumerate(zip(self.queries, self.query_labels)):
            lines.append(f"{name}" + ("" if query_label is None else f" (label {query_label})")
                         + f": {self.k} nearest of features/round-{self.round}")
            lines.append("  rank   index  similarity" + ("" if self.labels is None else "  label"))
            for rank in range(self.k):
                line = f"  {rank + 1:>4}  {self.neighbours[i, rank]:>6}  {self.similarities[i, rank]:>10.6f}"
                if self.labels is not None:
                    line += f"  {self.labels[i, rank]:>5}"
                lines.append(line)
        return "\n".join(lines)


def query_store(store: Store, *, indices=None, vectors=None, k: int = 10, round: int | None = None,
                in_memory_bytes: int = DEFAULT_IN_MEMORY_BYTES) -> QueryResult:
    """The k nearest rows of features/round-``round`` (default: the latest complete snapshot) to
    each of ``indices`` (sample numbers, self excluded) or ``vectors`` ((m, d) or (d,) floats).
    One-line UserErrors, before any search, for a missing round, a bad index, k or dimension."""
    if (indices is None) == (vectors is None):
        raise InvalidParameterError("give either sample indices (--index) or query vectors (--vectors), not both")
    n = store.info.n
    if round is None:
        round = store.latest_complete_features()
        if round is None:
            raise FeaturesNotReadyError(f"store {store.url} holds no complete feature snapshot yet: "
                                        f"finish a training round (or `trainer embed` into it) first")
    reader = store.feature_reader(round)
    by_index = indices is not None
    limit = n - 1 if by_index else n
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
        raise InvalidParameterError(
            f"k must satisfy 1 <= k <= {limit} (N = {n}{', self excluded' if by_index else ''}), got k = {k!r}")
    source = open_features(reader, torch.device("cpu"), in_memory_bytes)
    if by_index:
        rows = _checked_indices(indices, n)
        unique, inverse = np.unique(rows, return_inverse=True)     # the search wants sorted rows, once each
        similarities, neighbours = exact_knn_of_rows(source, torch.from_numpy(unique), int(k))
        similarities, neighbours = similarities[inverse], neighbours[inverse]
        names = [f"index {i}" for i in rows.tolist()]
    else:
        queries = _checked_vectors(vectors, reader.dim)
        similarities, neighbours = exact_knn_of_vectors(source, torch.from_numpy(queries), int(k))
        names = [f"vector {i}" for i in range(queries.shape[0])]
    labels = store.read_labels()
    query_labels = [int(labels[i]) if labels is not None else None for i in rows] if by_index else [None] * len(names)
    return QueryResult(
        round=round, k=int(k), queries=names, neighbours=neighbours.numpy(), similarities=similarities.numpy(),
        labels=None if labels is None else labels[neighbours.numpy()], query_labels=query_labels,
    )


def _checked_indices(indices, n: int) -> np.ndarray:
    rows = np.asarray(indices)
    if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise InvalidParameterError(f"indices must be one or more integers, got {indices!r}")
    bad = rows[(rows < 0) | (rows >= n)]
    if bad.size:
        raise InvalidParameterError(f"index {int(bad[0])} is not a sample of this store: indices are 0..{n - 1}")
    return rows.astype(np.int64)


def _checked_vectors(vectors, dim: int) -> np.ndarray:
    """(m, d) float32 unit rows from (m, d) or (d,) floating vectors of the snapshot's dimension."""
    queries = np.asarray(vectors)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[0] == 0 or not np.issubdtype(queries.dtype, np.floating):
        raise InvalidFeaturesError(f"query vectors must be a (m, d) or (d,) float array, got {queries.dtype} "
                                   f"of shape {np.shape(vectors)}")
    if queries.shape[1] != dim:
        raise InvalidFeaturesError(f"query vectors have dimension {queries.shape[1]}, the store's features have "
                                   f"{dim}: embed them with the run's model (`trainer embed`)")
    queries = queries.astype(np.float32)
    norms = np.linalg.norm(queries, axis=1)
    bad = np.nonzero(~np.isfinite(norms) | (norms == 0))[0]
    if bad.size:
        raise InvalidFeaturesError(f"query vector {int(bad[0])} is zero or not finite: it has no direction to compare")
    return np.ascontiguousarray(queries / norms[:, None])


def check_npy_size(path: str) -> None:
    """Before ``np.load(path)`` allocates the array a .npy header describes: that array's bytes
    must be in the file. A header may claim any shape (46 TiB of float32 in 192 bytes), and
    np.load allocates it before reading a byte: an allocation failure with a traceback, or a swap
    storm. A file that is not a .npy file is left to np.load to report. OSError (no such file)
    passes through to the caller."""
    from numpy.lib import format as npy

    with open(path, "rb") as fh:
        try:
            version = npy.read_magic(fh)
            # Version 3 differs from 2 only in decoding the header as UTF-8 instead of latin-1.
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, _, dtype = read_header(fh)
        except ValueError:
            return
        data_bytes = os.fstat(fh.fileno()).st_size - fh.tell()
    if dtype.hasobject:
        return   # np.load refuses object arrays (allow_pickle=False) before allocating
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > data_bytes:
        raise InvalidFeaturesError(
            f"--vectors {path}: its .npy header describes a {dtype} array of shape {tuple(shape)} "
            f"({claimed / 2**30:.3g} GiB), but the file holds {data_bytes} bytes after the header: "
            f"it is truncated or damaged; write it again (e.g. `trainer embed`)")

"""Feature sources for the blocked pass: a whole (N, d) matrix, or a reader read in row chunks.

The blocked pass never needs more than a query block and one database block at a time, so a
snapshot larger than RAM is served by :class:`ChunkedFeatures`, which reads row ranges from a
``storage.FeatureReader`` (or anything with ``n``, ``dim`` and ``read(start, stop)``).
A snapshot that fits comfortably in memory is loaded whole (:class:`InMemoryFeatures`): reading
it once is cheaper than re-reading database blocks for every query block.

Before any similarity is computed, :func:`scan_row_norms` reads every row once to validate it
(NaN/Inf, L2 norm) and to get the norms that bound the logits (see ``fused.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .blocks import row_blocks
from .errors import InvalidFeaturesError

# Memory-bank rows are L2-normalised by the trainer; a row further than this from norm 1 means
# the caller handed us something else (raw backbone features, a corrupted bank).
DEFAULT_NORM_TOLERANCE = 1e-3

# Snapshots up to this many bytes are loaded whole; larger ones are read in row chunks.
DEFAULT_IN_MEMORY_BYTES = 4 << 30

# Rows per read in chunked mode: a query super-block and a database super-block of this many
# rows are in memory at once (2 x 65536 x 128 x 4 B = 64 MiB at d = 128).
DEFAULT_CHUNK_READ_ROWS = 65536


class RowReader(Protocol):
    """What :class:`ChunkedFeatures` needs from a ``storage.FeatureReader``."""

    n: int
    dim: int

    def read(self, start: int, stop: int) -> np.ndarray: ...


class FeatureSource(Protocol):
    """Rows of the memory bank, served in super-blocks of ``read_rows`` rows on ``device``."""

    n: int
    dim: int
    device: torch.device
    read_rows: int

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as a contiguous (stop-start, d) float32 tensor on ``device``."""
        ...


@dataclass
class InMemoryFeatures:
    """The whole (N, d) float32 matrix on ``device``; ``read`` returns views, no copies."""

    rows: torch.Tensor

    def __post_init__(self) -> None:
        self.n, self.dim = (int(s) for s in self.rows.shape)
        self.device = self.rows.device
        self.read_rows = max(self.n, 1)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.rows[start:stop]


@dataclass
class ChunkedFeatures:
    """Rows read on demand from ``reader`` in super-blocks of ``read_rows`` rows.

    ``read_rows`` is rounded to a multiple of the reader's ``chunk_rows`` (when it has one) so
    that every read decodes whole storage chunks.
    """

    reader: RowReader
    device: torch.device
    read_rows: int = DEFAULT_CHUNK_READ_ROWS

    def __post_init__(self) -> None:
        self.n, self.dim = int(self.reader.n), int(self.reader.dim)
        chunk_rows = int(getattr(self.reader, "chunk_rows", 0) or 0)
        if chunk_rows > 0:
            self.read_rows = max(chunk_rows, (self.read_rows // chunk_rows) * chunk_rows)
        self.read_rows = max(1, min(self.read_rows, max(self.n, 1)))

    def read(self, start: int, stop: int) -> torch.Tensor:
        block = np.ascontiguousarray(self.reader.read(start, stop), dtype=np.float32)
        if block.shape != (stop - start, self.dim):
            raise InvalidFeaturesError(
                f"feature reader returned shape {block.shape} for rows {start}:{stop}, "
                f"expected ({stop - start}, {self.dim}); the snapshot is inconsistent"
            )
        tensor = torch.from_numpy(block)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor


def is_row_reader(features: object) -> bool:
    """True for a ``storage.FeatureReader`` or anything shaped like one."""
    return all(hasattr(features, name) for name in ("n", "dim", "read")) and not isinstance(
        features, (np.ndarray, torch.Tensor)
    )


def open_features(
    features,
    device: torch.device,
    in_memory_bytes: int = DEFAULT_IN_MEMORY_BYTES,
    chunk_read_rows: int = DEFAULT_CHUNK_READ_ROWS,
) -> FeatureSource:
    """Wrap ``features`` as a :class:`FeatureSource` on ``device``.

    features: torch.Tensor or np.ndarray (N, d), or a row reader (``storage.FeatureReader``).
    A reader whose snapshot is at most ``in_memory_bytes`` is read whole; larger ones are read in
    super-blocks of ``chunk_read_rows`` rows.
    """
    if is_row_reader(features):
        n, dim = int(features.n), int(features.dim)
        if n * dim * 4 <= in_memory_bytes:
            rows = np.ascontiguousarray(_read_all(features), dtype=np.float32)
            return InMemoryFeatures(_as_matrix(rows, "features").to(device))
        return ChunkedFeatures(features, device, chunk_read_rows)
    return InMemoryFeatures(_as_matrix(features, "features").to(device))


def _read_all(reader) -> np.ndarray:
    if hasattr(reader, "read_all"):
        return reader.read_all()
    return reader.read(0, reader.n)


def _as_matrix(features, name: str) -> torch.Tensor:
    """(N, d) float32 contiguous CPU-or-device tensor from an array or tensor."""
    if isinstance(features, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(features))
    elif isinstance(features, torch.Tensor):
        tensor = features.detach()
    else:
        raise InvalidFeaturesError(
            f"{name} must be a numpy array, a torch tensor or a storage.FeatureReader, "
            f"got {type(features).__name__}"
        )
    if tensor.ndim != 2:
        raise InvalidFeaturesError(f"{name} must be a 2-D (N, d) matrix, got shape {tuple(tensor.shape)}")
    if not (tensor.dtype.is_floating_point):
        raise InvalidFeaturesError(f"{name} must be floating point, got {tensor.dtype}")
    return tensor.to(torch.float32).contiguous()


def scan_row_norms(
    source: FeatureSource, norm_tolerance: float = DEFAULT_NORM_TOLERANCE
) -> torch.Tensor:
    """Validate every row once and return the row norms, (N,) float64 on the source's device.

    Raises InvalidFeaturesError naming the first row that holds NaN/Inf, or the first row whose
    L2 norm differs from 1 by more than ``norm_tolerance``.
    """
    norms = torch.empty(source.n, dtype=torch.float64, device=source.device)
    for start, stop in row_blocks(source.n, source.read_rows):
        rows = source.read(start, stop)
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            bad = start + int(torch.nonzero(~finite)[0, 0])
            raise InvalidFeaturesError(
                f"feature row {bad} contains NaN or Inf; the memory bank is corrupted "
                f"(re-run the training round that wrote it)"
            )
        block_norms = torch.linalg.vector_norm(rows.double(), dim=1)
        off = (block_norms - 1.0).abs() > norm_tolerance
        if bool(off.any()):
            bad_local = int(torch.nonzero(off)[0, 0])
            raise InvalidFeaturesError(
                f"feature row {start + bad_local} has L2 norm {float(block_norms[bad_local]):.6g}; "
                f"memory-bank rows must be L2-normalised (|norm - 1| <= {norm_tolerance:g})"
            )
        norms[start:stop] = block_norms
    return norms

"""``knn_entropy``: one interface over the torch (fused) and FAISS backends, on CPU or CUDA.

Backends:
- ``torch``: the fused blocked pass (``fused.py``) gives neighbours and entropy together.
- ``faiss``: exact IndexFlatIP k-NN (faiss-gpu on CUDA) plus the blocked pass for the entropy.
- ``faiss-ivf``: approximate IVF-Flat k-NN (recall@k reported) plus the blocked entropy pass.
- ``auto``: the fastest exact path, which is ``torch`` on both devices: the symmetric fused pass
  computes half of the N x N products, FAISS's k-NN all of them (``nbr-index bench`` measures
  both, README "Benchmarks and measurements"). On CUDA the fused pass with the Triton tile
  kernel is the one designed to approach a bare GEMM pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import check_k, resolve_device
from .errors import InvalidFeaturesError, InvalidParameterError
from .faiss_backend import default_nlist, faiss_gpu_device, flat_knn, import_faiss, ivf_knn, require_faiss_gpu
from .features import DEFAULT_CHUNK_READ_ROWS, DEFAULT_IN_MEMORY_BYTES, DEFAULT_NORM_TOLERANCE, open_features
from .fused import BlockSizes, Progress, Shard, knn_entropy_pass

BACKENDS = ("auto", "torch", "faiss", "faiss-ivf")


@dataclass
class KnnEntropy:
    """Neighbourhoods and entropies of a memory bank.

    neighbours: (N, k) int64, self excluded, ties -> lower index (exact backends);
    similarities: (N, k) float32 cosine similarities of those neighbours;
    entropy: (N,) float32, H_i over all N rows, self included (Eq 5).
    recall: recall@k of the approximate backend on a query sample (None for exact ones).
    details: backend parameters worth recording (nlist, nprobe, matmul precision, ...).
    """

    neighbours: np.ndarray
    similarities: np.ndarray
    entropy: np.ndarray
    backend: str
    device: str
    seconds: float
    recall: float | None = None
    details: dict = field(default_factory=dict)


def knn_entropy(
    features,
    k: int = 1,
    tau: float = 0.1,
    backend: str = "auto",
    device: str = "cpu",
    *,
    progress: Progress | None = None,
    in_memory_bytes: int = DEFAULT_IN_MEMORY_BYTES,
    chunk_read_rows: int = DEFAULT_CHUNK_READ_ROWS,
    block_sizes: BlockSizes | None = None,
    matmul_precision: str = "fp32",
    workers: int | None = None,
    tile_kernel: str = "auto",
    nlist: int | None = None,
    nprobe: int = 32,
    norm_tolerance: float = DEFAULT_NORM_TOLERANCE,
    expected_dim: int | None = None,
    shard: Shard | None = None,
) -> KnnEntropy:
    """k nearest neighbours (cosine, self excluded) and softmax entropy of every row.

    features: torch.Tensor / np.ndarray (N, d), or a storage.FeatureReader, which is read whole
    when its snapshot is at most ``in_memory_bytes`` and in row chunks of ``chunk_read_rows``
    otherwise. Rows must be L2-normalised (|norm - 1| <= norm_tolerance) and finite.
    expected_dim: when given, a different feature dimension is an error.
    shard: this worker's share of a pass split over several processes (``nbr_index.shard``);
    backend torch only. Every worker returns the whole result.
    """
    started = time.perf_counter()
    torch_device = resolve_device(device)
    backend = resolve_backend(backend, torch_device)
    source = open_features(features, torch_device, in_memory_bytes, chunk_read_rows)
    if expected_dim is not None and source.dim != expected_dim:
        raise InvalidFeaturesError(f"features have dimension {source.dim}, expected {expected_dim} (the store's dim)")
    check_k(k, source.n)

    if shard is not None and shard.count > 1 and backend != "torch":
        raise InvalidParameterError(f"a rebuild split over workers needs backend torch (or auto), got {backend}")

    pass_options = dict(
        block_sizes=block_sizes,
        matmul_precision=matmul_precision,
        norm_tolerance=norm_tolerance,
        workers=workers,
        tile_kernel=tile_kernel,
        progress=progress,
        shard=shard,
    )
    details: dict = {"matmul_precision": matmul_precision}
    recall = None
    if backend == "torch":
        result = knn_entropy_pass(source, k, tau, **pass_options)
        neighbours, similarities = result.neighbours.numpy(), result.similarities.numpy()
        entropy = result.entropy.numpy()
    else:
        # Entropy first: the pass validates every row before FAISS sees them.
        result = knn_entropy_pass(source, 0, tau, **pass_options)
        entropy = result.entropy.numpy()
        gpu = faiss_gpu_device(torch_device) if torch_device.type == "cuda" else None
        if backend == "faiss":
            knn = flat_knn(source, k, gpu=gpu, progress=progress)
            details["recomputed_tie_rows"] = knn.recomputed_rows
        else:
            nlist = nlist or default_nlist(source.n)
            knn = ivf_knn(source, k, nlist=nlist, nprobe=nprobe, gpu=gpu, progress=progress)
            details.update(nlist=nlist, nprobe=min(nprobe, nlist))
            recall = knn.recall
        neighbours, similarities = knn.neighbours, knn.similarities
    details["tile_kernel"] = result.tile_kernel
    if shard is not None:
        details["world_size"] = shard.count
    return KnnEntropy(
        neighbours=neighbours,
        similarities=similarities,
        entropy=entropy,
        backend=backend,
        device=torch_device.type,
        seconds=time.perf_counter() - started,
        recall=recall,
        details=details,
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``; checks that FAISS is importable."""
    if backend not in BACKENDS:
        raise InvalidParameterError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "torch"
    if backend.startswith("faiss"):
        import_faiss()                       # a one-line error when FAISS is missing
        if device.type == "cuda":
            require_faiss_gpu()
    return backend

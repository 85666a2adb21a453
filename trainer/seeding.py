"""Reproducibility: seeds derived from keys, and torch's deterministic mode.

Every random stream of a run is seeded from (run seed, purpose, round, epoch[, rank]) rather
than carried over from the previous epoch, so a run resumed at an epoch boundary draws exactly
what the uninterrupted run drew, without replaying anything.
"""
from __future__ import annotations

import os

import numpy as np
import torch


def derive_seed(*keys) -> int:
    """A 63-bit seed from integer / string keys (numpy SeedSequence mixing: no collisions in practice)."""
    words = []
    for key in keys:
        if isinstance(key, str):
            words.extend(key.encode())
        else:
            words.append(int(key))
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def generator(*keys) -> torch.Generator:
    """A CPU torch.Generator seeded from ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def set_determinism(enabled: bool) -> None:
    """torch.use_deterministic_algorithms, with the cuBLAS workspace setting CUDA needs for it.

    warn_only: an op without a deterministic kernel on some device warns instead of stopping a
    long run; the training step's ops (conv, matmul, log_softmax, index copies) all have one.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)

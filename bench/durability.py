"""What durable writes cost: the store's writes of one round, with fsync as shipped and with
fsync replaced by a no-op, measured in one run.

One round's writes are what the trainer and the index do between two rounds: a feature snapshot
(N, d) float32 (prepare, every chunk and its digest, complete), a neighbourhood round (N, k) int64
plus entropy and anchors (publish), and a checkpoint of the bank (torch.save, temp + rename).

    python bench/durability.py --n 1500 --dim 128          # the default job's N (digits)
    python bench/durability.py --n 1000000 --dim 128       # ImageNet-scale N

Prints seconds per step for both variants (the best of --repeats) and their ratio.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from unittest import mock

import click
import numpy as np
import torch

from storage import Store
from trainer.checkpoint import save_checkpoint


@contextmanager
def fsync_disabled():
    """os.fsync as a no-op everywhere (the storage and checkpoint code call it through ``os``)."""
    with mock.patch.object(os, "fsync", lambda fd: None):
        yield


def one_round(root: str, bank: np.ndarray, neighbours: np.ndarray, entropy: np.ndarray,
              anchor: np.ndarray) -> dict[str, float]:
    """Seconds of each write of one round into a fresh store under ``root``."""
    n, dim = bank.shape
    store = Store.create_or_open(os.path.join(root, "store"), n=n, dim=dim, dataset_id="durability",
                                 curriculum={"rounds": 4, "k": 1, "tau": 0.1, "mode": "progressive"})
    seconds = {}
    start = time.perf_counter()
    store.write_features(0, bank)
    seconds["features"] = time.perf_counter() - start
    start = time.perf_counter()
    store.publish_neighbourhoods(1, neighbours, entropy, anchor,
                                 {"k": neighbours.shape[1], "tau": 0.1, "fraction": 0.25, "mode": "progressive",
                                  "source_features_round": 0, "backend": "bench", "seconds": 0.0})
    seconds["neighbourhoods"] = time.perf_counter() - start
    start = time.perf_counter()
    save_checkpoint(os.path.join(root, "checkpoint.pt"), {"memory": torch.from_numpy(bank)})
    seconds["checkpoint"] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())
    return seconds


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--n", "n", default=1500, show_default=True, help="rows N (samples)")
@click.option("--dim", default=128, show_default=True, help="feature dimension d")
@click.option("--k", default=1, show_default=True, help="neighbours per row")
@click.option("--repeats", default=3, show_default=True, help="best of this many runs per variant")
@click.option("--dir", "directory", default=None, help="where to write (default: a temporary directory)")
def main(n: int, dim: int, k: int, repeats: int, directory: str | None) -> None:
    """Seconds of one round's durable writes, with and without fsync, and their ratio."""
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((n, dim), dtype=np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    neighbours = rng.integers(0, n, size=(n, k), dtype=np.int64)
    entropy = rng.random(n, dtype=np.float32)
    anchor = entropy < 0.25
    best = {}
    for variant in ("fsync", "no fsync"):
        for _ in range(repeats):
            root = tempfile.mkdtemp(dir=directory, prefix="durability-")
            try:
                if variant == "fsync":
                    seconds = one_round(root, bank, neighbours, entropy, anchor)
                else:
                    with fsync_disabled():
                        seconds = one_round(root, bank, neighbours, entropy, anchor)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            previous = best.get(variant)
            if previous is None or seconds["total"] < previous["total"]:
                best[variant] = seconds
    click.echo(f"N={n:,} d={dim} k={k}, best of {repeats}:")
    click.echo(f"{'write':<16}{'fsync (s)':>12}{'no fsync (s)':>14}{'ratio':>8}")
    for step in ("features", "neighbourhoods", "checkpoint", "total"):
        on, off = best["fsync"][step], best["no fsync"][step]
        click.echo(f"{step:<16}{on:>12.3f}{off:>14.3f}{on / off:>8.2f}")


if __name__ == "__main__":
    main()

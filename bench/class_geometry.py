"""Where training puts the classes: cosine statistics of each feature round of finished runs' stores.

    .venv/bin/python bench/class_geometry.py --store runs/accuracy-machineD/cifar10-10k/project-and-oracle-seed0/store \
        --store runs/accuracy-machineD/cifar10-10k/project-instance-seed0/store

The neighbourhood loss pulls an anchor towards its k neighbours. Whether that pull reaches the
class as a whole or only the pair is what decides how much right neighbourhoods can lift a kNN
classifier, and this measures it on the stored memory banks (labels only measure). For every
complete features/round-r of every store, over the unit-normalised rows:

- nearest own-class: mean over rows i of max_{j != i, y_j = y_i} cos(f_i, f_j), the pair the
  ``oracle`` selection gives an anchor at k = 1 (how close the pairs it pulls already are);
- same class: mean cos over all pairs i != j of one class; different class: over all pairs of two
  classes; both exact, from the per-class sums (|s_c|^2 - n_c over n_c(n_c - 1) pairs, and so on);
- class gap: same class minus different class, how far apart the classes stand, which is what a
  kNN vote over many neighbours reads.
"""
from __future__ import annotations

import os
import sys

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbr_index.selection import class_nearest  # noqa: E402
from bench.run_stores import store_options, store_urls, write_rows  # noqa: E402
from storage import Store  # noqa: E402

COLUMNS = ("nearest own-class", "same class", "different class", "class gap")


def class_geometry(features: np.ndarray, labels: np.ndarray) -> dict:
    """The four statistics of COLUMNS for features (N, d) (any norm; rows are normalised here) and
    labels (N,) int, every class with at least 2 rows. Exact, in float64."""
    unit = np.asarray(features, dtype=np.float64)
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    labels = np.asarray(labels)
    nearest = class_nearest(unit, labels, 1)[:, 0]
    classes, counts = np.unique(labels, return_counts=True)
    sums = np.stack([unit[labels == c].sum(axis=0) for c in classes])          # (C, d)
    within = np.einsum("cd,cd->c", sums, sums) - counts                         # sum over ordered pairs i != j
    total = unit.sum(axis=0)
    same = within.sum() / float((counts * (counts - 1)).sum())
    different = (total @ total - np.einsum("cd,cd->", sums, sums)) / float(counts.sum() ** 2 - (counts ** 2).sum())
    return {"nearest own-class": float(np.einsum("nd,nd->n", unit, unit[nearest]).mean()),
            "same class": float(same), "different class": float(different), "class gap": float(same - different)}


def store_geometry(store: Store) -> list[dict]:
    """One row per complete feature round of the store: {"round", *COLUMNS}."""
    labels = store.read_labels()
    if labels is None:
        raise click.ClickException(f"store {store.url} holds no labels: class geometry cannot be measured")
    return [{"round": r, **class_geometry(store.feature_reader(r).read_all(), labels)}
            for r in store.complete_feature_rounds()]


@click.command()
@store_options
def main(store_patterns: tuple[str, ...], json_out: str | None) -> None:
    """Print, per store and feature round, the mean cosines of COLUMNS."""
    urls = store_urls(store_patterns)
    per_store = {url: store_geometry(Store.open(url)) for url in urls}
    click.echo("mean cosine of unit memory-bank rows (labels only measure)\n")
    click.echo("| store | features round | " + " | ".join(COLUMNS) + " |")
    click.echo("|---|---|" + "---|" * len(COLUMNS))
    for url, rows in per_store.items():
        for row in rows:
            click.echo(f"| {url} | {row['round']} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + " |")
    write_rows(json_out, per_store)


if __name__ == "__main__":
    main()

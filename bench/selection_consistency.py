"""Anchor consistency of every selection rule on the same memory banks: the store of one finished run.

    .venv/bin/python bench/selection_consistency.py --store runs/accuracy/cifar10-10k/project-and-seed2/store
    .venv/bin/python bench/selection_consistency.py --store 'runs/accuracy/digits/project-and-seed*/store'

A training run's anchors come from its own rule, so two runs' consistencies differ by their banks
as well as by their rules. This replays the selection on ONE run's banks instead: for every
round r = 1..R it computes the k-NN and entropies of features/round-(r-1) (the fused pass, as
rebuild does), then selects the curriculum's anchors with each rule of ``nbr_index.selection``
(``stable`` against the k-NN of features/round-(r-2), which is what a run with that rule would
have published, where r >= 2), and prints the percentage of anchors whose k neighbours all share
their label. Two baselines bracket the rules: ``random`` (the same count of rows drawn at random,
seeded) and ``all rows`` (every row's neighbourhood). Labels only measure; no rule sees them.
With several stores (a glob, or --store given again: the runs of several seeds), each cell is the
mean ± std over them.
"""
from __future__ import annotations

import os
import statistics
import sys

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbr_index import (SELECTIONS, anchor_count, knn_entropy, mutual_nearest,  # noqa: E402
                       neighbourhood_consistency, select_anchors, stable_nearest)
from nbr_index.rebuild import store_curriculum  # noqa: E402
from nbr_index.selection import preferred_rows  # noqa: E402
from bench.run_stores import store_options, store_urls, write_rows  # noqa: E402
from storage import Store  # noqa: E402


def replay(store: Store, seed: int = 0) -> list[dict]:
    """One row per round: {"round", "anchors", "<rule>": consistency %, "random", "all rows"}."""
    curriculum = store_curriculum(store)
    labels = store.read_labels()
    if labels is None:
        raise click.ClickException(f"store {store.url} holds no labels: consistency cannot be measured")
    complete = store.complete_feature_rounds()
    rows, previous = [], None
    for r in range(1, curriculum["rounds"] + 1):
        if r - 1 not in complete:
            break
        result = knn_entropy(store.feature_reader(r - 1), k=curriculum["k"], tau=curriculum["tau"])
        neighbours = np.asarray(result.neighbours)
        mutual = mutual_nearest(neighbours)
        stable = None if previous is None else stable_nearest(neighbours, previous)
        cap = curriculum["max_anchor_fraction"]
        count = anchor_count(store.info.n, r, curriculum["rounds"], curriculum["mode"], cap)
        row = {"round": r, "anchors": count}
        for rule in SELECTIONS:
            anchor = select_anchors(result.entropy, r, curriculum["rounds"], curriculum["mode"],
                                    preferred_rows(rule, mutual, stable), cap)
            row[rule] = neighbourhood_consistency(neighbours, anchor, labels)
        drawn = np.zeros(store.info.n, dtype=bool)
        drawn[np.random.default_rng(seed + r).choice(store.info.n, count, replace=False)] = True
        row["random"] = neighbourhood_consistency(neighbours, drawn, labels)
        row["all rows"] = neighbourhood_consistency(neighbours, np.ones(store.info.n, dtype=bool), labels)
        row["mutual rows"] = float(mutual.mean()) * 100
        row["stable rows"] = None if stable is None else float(stable.mean()) * 100
        rows.append(row)
        previous = neighbours
    return rows


@click.command()
@store_options
def main(store_patterns: tuple[str, ...], json_out: str | None) -> None:
    """Replay every selection rule on runs' memory banks; print the anchors' consistency per round."""
    urls = store_urls(store_patterns)
    per_store = {url: replay(Store.open(url)) for url in urls}
    rounds = min(len(rows) for rows in per_store.values())
    columns = [*SELECTIONS, "random", "all rows", "mutual rows", "stable rows"]
    click.echo(f"anchor consistency (%) per round, every rule replayed on the same banks; "
               f"mean ± std over {len(urls)} store(s): {', '.join(urls)}\n")
    click.echo("| round | anchors | " + " | ".join(columns[:-2]) + " | mutual rows % | stable rows % |")
    click.echo("|---|---|" + "---|" * len(columns))
    for i in range(rounds):
        first = per_store[urls[0]][i]
        cells = [_mean_std([rows[i][c] for rows in per_store.values()]) for c in columns]
        click.echo(f"| {first['round']} | {first['anchors']} | " + " | ".join(cells) + " |")
    write_rows(json_out, per_store)


def _mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


if __name__ == "__main__":
    main()

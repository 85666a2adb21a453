"""What a run reports: the per-round table, ``summary.json`` and the plots.

summary.json:
    config          the full resolved TrainConfig
    rounds          [{round, knn_top1, best_epoch_knn_top1, best_epoch, anchors, consistency, seconds}];
                    knn_top1 is the round's last epoch, best_epoch_knn_top1 its best evaluated epoch
                    (0-based ``best_epoch``); kNN and consistency in percent, consistency null where a
                    round has no anchors
    final_knn_top1  kNN top-1 (percent) after the last epoch of the last round: the number to compare
    best_epoch      {round, epoch, knn_top1} of the best evaluated epoch of the run: what the authors'
                    code keeps (it evaluates after every epoch and saves the best); labelled, since
                    picking the best of many test evaluations flatters it
    epochs          [{round, epoch, lr, loss, images_per_s, seconds, knn_top1 where evaluated}]
    plus dataset facts (n_train, n_test, num_classes), mean training images/s and wall seconds.
"""
from __future__ import annotations

import json
import os

import numpy as np


def round_table(rows: list[dict]) -> str:
    """The per-round table as text."""
    lines = [f"{'round':>5}  {'kNN top-1':>9}  {'best epoch':>10}  {'anchors':>8}  {'consistency':>11}  {'seconds':>8}"]
    for row in rows:
        cons = "-" if row.get("consistency") is None else f"{row['consistency']:.1f}%"
        knn = "-" if row.get("knn_top1") is None else f"{row['knn_top1']:.2f}%"   # None: no test split
        best = row.get("best_epoch_knn_top1")
        best = "-" if best is None else f"{best:.2f}%"
        lines.append(f"{row['round']:>5}  {knn:>9}  {best:>10}  {row['anchors']:>8d}  {cons:>11}  "
                     f"{row['seconds']:>8.1f}")
    return "\n".join(lines)


def best_epoch(history: list[dict], round: int | None = None) -> dict:
    """{round, epoch, knn_top1} of the evaluated epoch with the highest kNN (of ``round`` only, if
    given); a tie goes to the later epoch, as the authors' ``acc >= best_acc``. history rows are
    the ``epochs`` of summary.json. All None when no epoch was evaluated."""
    best = {"round": None, "epoch": None, "knn_top1": None}
    for row in history:
        if row.get("knn_top1") is None or (round is not None and row["round"] != round):
            continue
        if best["knn_top1"] is None or row["knn_top1"] >= best["knn_top1"]:
            best = {"round": row["round"], "epoch": row["epoch"], "knn_top1": row["knn_top1"]}
    return best


def write_summary(run_dir: str, config: dict, rows: list[dict], extra: dict | None = None) -> str:
    """Write ``<run_dir>/summary.json``; returns its path."""
    summary = {
        "config": config,
        "rounds": rows,
        "final_knn_top1": rows[-1]["knn_top1"] if rows else None,
        **(extra or {}),
    }
    path = os.path.join(run_dir, "summary.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=2)
    os.replace(tmp, path)
    return path


def save_plots(run_dir: str, rows: list[dict], entropies: dict[int, np.ndarray]) -> list[str]:
    """PNG plots (matplotlib Agg): kNN top-1 per round, anchor consistency per round, and the
    entropy distribution of each neighbourhood round (the quantity anchors are selected by)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rounds = [r["round"] for r in rows]

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(rounds, [np.nan if r["knn_top1"] is None else r["knn_top1"] for r in rows], marker="o")  # None: no test split
    ax.set(xlabel="training round", ylabel="kNN top-1 (%)", title="kNN accuracy per round")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, run_dir, "knn_per_round.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    cons = [(r["round"], r["consistency"]) for r in rows if r.get("consistency") is not None]
    if cons:
        ax.plot([c[0] for c in cons], [c[1] for c in cons], marker="o", color="tab:green")
        ax.set_xticks([c[0] for c in cons])
    else:
        ax.text(0.5, 0.5, "no anchors in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="training round", ylabel="anchor neighbourhood consistency (%)",
           title="Neighbourhood class consistency")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, run_dir, "consistency_per_round.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    draw_entropy_histograms(ax, entropies)
    ax.set_title("Entropy distribution per round")
    paths.append(_save(fig, run_dir, "entropy_per_round.png"))
    return paths


def draw_entropy_histograms(ax, entropies: dict[int, np.ndarray], missing: str | None = None) -> None:
    """One step histogram per round of {round: (N,) entropy} on ``ax``; ``missing`` (or, without
    rounds, a note that there are none) is written instead when there is nothing to draw."""
    if entropies and missing is None:
        for r in sorted(entropies):
            ax.hist(entropies[r], bins=50, histtype="step", label=f"round {r}")
        ax.legend(loc="upper left")   # a fixed place: "best" searches through every histogram step
    else:
        ax.text(0.5, 0.5, missing or "no neighbourhood rounds in this run", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(xlabel="entropy H_i of p_i (nats)", ylabel="samples")


def _save(fig, run_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

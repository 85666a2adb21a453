"""``trainer report``: plots and a Markdown table from the ``summary.json`` of one or several runs.

Written to the output folder:

    knn.png          kNN top-1 per epoch (the evaluated epochs, ``--eval-every``, and every
                     round's end) with the round boundaries, and kNN top-1 per round
    curriculum.png   per round: the anchors whose neighbourhood is class-consistent and those
                     that are not (stacked, the paper's Fig 6), and the consistency in percent
    entropy.png      the entropy distribution H_i of each neighbourhood round, one panel per run
                     (read from the run's store; a run whose store is gone says so)
    report.md        one row per run: method, data, budget, final and best kNN, anchors, consistency

Several runs (AND against Instance, say) share each plot, one colour per run.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from trainer import report
from trainer.errors import TrainerError


@dataclass
class RunRecord:
    """One run's summary.json, with the entropies of its neighbourhood rounds where its store is."""
    run_dir: str
    summary: dict
    entropies: dict[int, np.ndarray]
    store_found: bool

    @property
    def config(self) -> dict:
        return self.summary["config"]

    @property
    def epochs_per_round(self) -> int:
        return int(self.config["epochs_per_round"])

    def knn_curve(self) -> tuple[list[int], list[float]]:
        """(global epoch, kNN top-1) of every evaluated epoch and every round's end, in order."""
        points = {}
        for row in self.summary.get("epochs", []):
            if row.get("knn_top1") is not None:
                points[row["round"] * self.epochs_per_round + row["epoch"] + 1] = row["knn_top1"]
        for row in self.summary["rounds"]:
            if row.get("knn_top1") is not None:
                points[(row["round"] + 1) * self.epochs_per_round] = row["knn_top1"]
        steps = sorted(points)
        return steps, [points[s] for s in steps]

    def best_knn(self) -> tuple[float, str] | None:
        """The highest kNN top-1 of any evaluated epoch or round end, and where it was."""
        steps, values = self.knn_curve()
        if not values:
            return None
        at = int(np.argmax(values))
        r, epoch = divmod(steps[at] - 1, self.epochs_per_round)
        return values[at], f"round {r} epoch {epoch + 1}"


def load_run(run_dir: str) -> RunRecord:
    """Read ``run_dir/summary.json`` and, where the run's store can be opened, its entropies."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        raise TrainerError(f"{run_dir} has no summary.json: pass the run directory of a finished `trainer run`")
    try:
        with open(path) as fh:
            summary = json.load(fh)
    except ValueError as err:
        raise TrainerError(f"{path} is not valid JSON ({err})") from None
    if not (isinstance(summary, dict) and isinstance(summary.get("config"), dict)
            and isinstance(summary.get("rounds"), list)):
        raise TrainerError(f"{path} is not a trainer summary (no config and rounds)")
    entropies, found = _store_entropies(run_dir, summary["config"])
    return RunRecord(run_dir, summary, entropies, found)


def _store_entropies(run_dir: str, config: dict) -> tuple[dict[int, np.ndarray], bool]:
    """{round: (N,) entropy} from the store the run used: its recorded URL, or <run_dir>/store when
    the recorded path was relative to another working directory."""
    from storage import Store, StoreError

    for url in dict.fromkeys([config.get("store"), os.path.join(run_dir, "store")]):
        if not url:
            continue
        try:
            store = Store.open(url)
        except StoreError:
            continue
        rounds = [r for r in store.published_rounds() if 1 <= r <= int(config["rounds"])]
        return {r: np.asarray(store.read_neighbourhoods(r).entropy) for r in rounds}, True
    return {}, False


def run_labels(runs: list[RunRecord]) -> list[str]:
    """The method of each run, with its folder name where methods repeat."""
    methods = [run.config["method"] for run in runs]
    return [m if methods.count(m) == 1 else f"{m} ({os.path.basename(os.path.normpath(run.run_dir))})"
            for m, run in zip(methods, runs)]


def write_report(run_dirs: list[str], out: str) -> tuple[list[str], str]:
    """Write the PNGs and report.md of the runs to ``out``; returns (paths, the Markdown table)."""
    runs = [load_run(d) for d in run_dirs]          # every input checked before anything is written
    os.makedirs(out, exist_ok=True)
    labels = run_labels(runs)
    table = markdown_table(runs, labels)
    paths = [plot_knn(runs, labels, out), plot_curriculum(runs, labels, out), plot_entropy(runs, labels, out)]
    md_path = os.path.join(out, "report.md")
    with open(md_path, "w") as fh:
        fh.write(table + "\n")
    return [*paths, md_path], table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_knn(runs: list[RunRecord], labels: list[str], out: str) -> str:
    plt = _pyplot()
    fig, (per_epoch, per_round) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (run, label) in enumerate(zip(runs, labels)):
        colour = f"C{i}"
        steps, values = run.knn_curve()
        per_epoch.plot(steps, values, marker="." if len(steps) > 12 else "o", color=colour, label=label)
        rows = [r for r in run.summary["rounds"] if r.get("knn_top1") is not None]
        per_round.plot([r["round"] for r in rows], [r["knn_top1"] for r in rows], marker="o", color=colour,
                       label=label)
    first = runs[0]
    for r in range(1, int(first.config["rounds"]) + 1):   # where round r (new anchors, lr restart) begins
        per_epoch.axvline(r * first.epochs_per_round, color="grey", linestyle=":", linewidth=1)
    per_epoch.set(xlabel=f"epoch (dotted: round boundaries, every {first.epochs_per_round})",
                  ylabel="kNN top-1 (%)", title="kNN accuracy per epoch")
    per_round.set(xlabel="training round", ylabel="kNN top-1 (%)", title="kNN accuracy per round")
    per_round.set_xticks(range(max(int(run.config["rounds"]) for run in runs) + 1))
    for ax in (per_epoch, per_round):
        ax.grid(alpha=0.3)
        ax.legend()
    return report._save(fig, out, "knn.png")


def plot_curriculum(runs: list[RunRecord], labels: list[str], out: str) -> str:
    """Fig 6 of the paper: class-consistent and inconsistent anchor neighbourhoods per round."""
    plt = _pyplot()
    fig, (counts, percent) = plt.subplots(1, 2, figsize=(10, 3.8))
    with_anchors = [(i, run, label) for i, (run, label) in enumerate(zip(runs, labels))
                    if any(r.get("consistency") is not None for r in run.summary["rounds"])]
    width = 0.8 / max(1, len(with_anchors))
    for slot, (i, run, label) in enumerate(with_anchors):
        rows = [r for r in run.summary["rounds"] if r.get("consistency") is not None]
        x = np.array([r["round"] for r in rows]) + (slot - (len(with_anchors) - 1) / 2) * width
        anchors = np.array([r["anchors"] for r in rows], dtype=float)
        consistent = np.round(anchors * np.array([r["consistency"] for r in rows]) / 100.0)
        counts.bar(x, consistent, width, color=f"C{i}", label=f"{label}: consistent")
        counts.bar(x, anchors - consistent, width, bottom=consistent, color=f"C{i}", alpha=0.35,
                   label=f"{label}: inconsistent")
        percent.plot([r["round"] for r in rows], [r["consistency"] for r in rows], marker="o", color=f"C{i}",
                     label=label)
    if not with_anchors:
        for ax in (counts, percent):
            ax.text(0.5, 0.5, "no anchors in these runs", ha="center", va="center", transform=ax.transAxes)
    else:
        counts.legend(fontsize="small")
        percent.legend()
    counts.set(xlabel="training round", ylabel="anchor neighbourhoods",
               title="Class-consistent anchor neighbourhoods (Fig 6)")
    percent.set(xlabel="training round", ylabel="consistency (%)", title="Anchor neighbourhood consistency")
    rounds = range(1, max(int(run.config["rounds"]) for run in runs) + 1)
    for ax in (counts, percent):
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    return report._save(fig, out, "curriculum.png")


def plot_entropy(runs: list[RunRecord], labels: list[str], out: str) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False)
    for ax, run, label in zip(axes[0], runs, labels):
        missing = None if run.store_found else f"store of {run.run_dir} not found"
        report.draw_entropy_histograms(ax, run.entropies, missing)
        ax.set_title(f"Entropy per round: {label}")
    return report._save(fig, out, "entropy.png")


def markdown_table(runs: list[RunRecord], labels: list[str]) -> str:
    """One row per run (kNN in percent; 'best' is the highest of any evaluated epoch or round end)."""
    lines = ["| run | data | model | rounds x epochs | kNN per round | final kNN | best kNN | anchors | "
             "consistency | img/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run, label in zip(runs, labels):
        cfg, rows = run.config, run.summary["rounds"]
        last = rows[-1] if rows else {}
        best = run.best_knn()
        knn = ", ".join("-" if r.get("knn_top1") is None else f"{r['knn_top1']:.2f}" for r in rows)
        images_per_s = run.summary.get("mean_images_per_s")
        cells = [label, cfg["dataset"], cfg["arch"], f"{int(cfg['rounds']) + 1} x {cfg['epochs_per_round']}", knn,
                 _percent(run.summary.get("final_knn_top1")),
                 "-" if best is None else f"{best[0]:.2f}% ({best[1]})",
                 f"{last.get('anchors', 0):,}", _percent(last.get("consistency"), 1),
                 "-" if images_per_s is None else f"{images_per_s:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}%"

"""TensorBoard event files of a run: ``<run_dir>/tensorboard/`` (``tensorboard --logdir runs``).

Written by rank 0 when the optional ``tensorboard`` package is installed
(``pip install 'and-nbr[tensorboard]'``) and the run's ``tensorboard`` setting is on (the
default; ``--no-tensorboard`` turns it off). Without the package nothing changes: no files, no
messages, no dependency.

Tags and their step (``E`` = epochs per round, global epoch = ``r * E + epoch + 1``):

    train/loss, train/lr, train/images_per_s   per epoch, step = global epoch
    eval/knn_top1                             per evaluated epoch (``--eval-every``) and at every
                                              round's end, step = global epoch
    round/knn_top1, round/anchors,            per round, step = round r
    round/anchor_fraction, round/consistency
    round/entropy                             histogram of H_i of neighbourhoods/round-r, step = r

A resumed run purges the events of the epochs it trains again (SummaryWriter's ``purge_step``),
so the curves show each epoch once.
"""
from __future__ import annotations

import os

import numpy as np

EVENTS_DIR = "tensorboard"


def tensorboard_available() -> bool:
    """True where torch's SummaryWriter can run (it needs the ``tensorboard`` package)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class EventLog:
    """Scalars and histograms of one run (see the module docstring). ``writer`` is None where
    nothing is written; every method is then a no-op, so the loop calls them unconditionally."""

    def __init__(self, writer, epochs_per_round: int, n_train: int):
        self.writer, self.epochs_per_round, self.n_train = writer, epochs_per_round, n_train

    @classmethod
    def open(cls, run_dir: str, enabled: bool, epochs_per_round: int, n_train: int,
             resume_step: int | None = None) -> "EventLog":
        """The run's event log; ``resume_step``: for a resumed run, the global epoch it continues
        after (the interrupted attempt's events after it are purged)."""
        if not (enabled and tensorboard_available()):
            return cls(None, epochs_per_round, n_train)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, EVENTS_DIR), flush_secs=10,
                               purge_step=None if resume_step is None else resume_step + 1)
        return cls(writer, epochs_per_round, n_train)

    @property
    def active(self) -> bool:
        return self.writer is not None

    def epoch(self, row: dict) -> None:
        """row: the loop's per-epoch row {round, epoch, lr, loss, images_per_s, seconds[, knn_top1]}."""
        if self.writer is None:
            return
        step = row["round"] * self.epochs_per_round + row["epoch"] + 1
        for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/images_per_s", "images_per_s")):
            self.writer.add_scalar(tag, row[key], step)
        if row.get("knn_top1") is not None:
            self.writer.add_scalar("eval/knn_top1", row["knn_top1"], step)

    def round(self, row: dict, entropy: np.ndarray | None = None) -> None:
        """row: the loop's per-round row {round, knn_top1, anchors, consistency, seconds};
        entropy: (N,) H_i of the round's neighbourhoods (None for rounds without them)."""
        if self.writer is None:
            return
        r = row["round"]
        if row.get("knn_top1") is not None:
            self.writer.add_scalar("eval/knn_top1", row["knn_top1"], (r + 1) * self.epochs_per_round)
            self.writer.add_scalar("round/knn_top1", row["knn_top1"], r)
        self.writer.add_scalar("round/anchors", row["anchors"], r)
        self.writer.add_scalar("round/anchor_fraction", row["anchors"] / self.n_train, r)
        if row.get("consistency") is not None:
            self.writer.add_scalar("round/consistency", row["consistency"], r)
        if entropy is not None:
            self.writer.add_histogram("round/entropy", np.asarray(entropy, dtype=np.float64), r)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

"""Which rows fill a round's anchor places: the paper's entropy rule, and one beyond it.

The curriculum fixes how many anchors a round has (``curriculum.anchor_count``: floor(N r / R),
or N); a selection rule decides which rows they are. Every rule is computed from what the pass
already returns (entropies and neighbours), never from labels, and is exact:

- ``entropy`` (the paper, Eq 6): the lowest-entropy rows.
- ``mutual``: rows that are a mutual nearest neighbour first (i is among the k nearest of its own
  nearest neighbour j), the lowest-entropy of them; then, while places remain, the other rows
  by entropy. The hope was that a pair of rows picking each other is more often of one class than
  a one-way pick; measured (README, "Beyond the paper"), the anchors' class consistency came out
  slightly lower than the entropy rule's in rounds 1-3 on digits and CIFAR-10, kNN higher on digits
  and lower on CIFAR-10, so entropy stays the default. In the last round of the progressive
  curriculum every row is an anchor and both rules agree.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidParameterError

SELECTIONS = ("entropy", "mutual")


def check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise InvalidParameterError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")


def mutual_nearest(neighbours: np.ndarray) -> np.ndarray:
    """(N,) bool: row i is among the k nearest of its nearest neighbour neighbours[i, 0].

    neighbours: (N, k) int, self excluded, nearest first.
    """
    neighbours = np.asarray(neighbours)
    if neighbours.ndim != 2 or neighbours.shape[1] < 1:
        raise InvalidParameterError(f"neighbours must be an (N, k) array with k >= 1, got shape {neighbours.shape}")
    nearest = neighbours[:, 0]
    rows = np.arange(neighbours.shape[0])
    return (neighbours[nearest] == rows[:, None]).any(axis=1)


def preferred_rows(selection: str, mutual: np.ndarray) -> np.ndarray | None:
    """(N,) bool of the rows a rule takes first, or None when it ranks by entropy alone.
    mutual: (N,) bool, ``mutual_nearest`` of the round's neighbours (computed once per round)."""
    check_selection(selection)
    return mutual if selection == "mutual" else None

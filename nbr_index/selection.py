"""Which rows fill a round's anchor places: the paper's entropy rule, and two beyond it.

The curriculum fixes how many anchors a round has (``curriculum.anchor_count``: floor(N r / R),
or N); a selection rule decides which rows they are. Every rule is computed from what the pass
already returns (entropies and neighbours), never from labels, and is exact:

- ``entropy`` (the paper, Eq 6): the lowest-entropy rows.
- ``mutual``: rows that are a mutual nearest neighbour first (i is among the k nearest of its own
  nearest neighbour j), the lowest-entropy of them; then, while places remain, the other rows
  by entropy. The hope was that a pair of rows picking each other is more often of one class than
  a one-way pick. Measured (README, "Beyond the paper"): the anchors' class consistency is lower
  than the entropy rule's in rounds 1-3 on digits and CIFAR-10, and kNN is not higher beyond the
  spread on either, so entropy stays the default.
- ``stable``: rows whose nearest neighbour now was also among their k neighbours in the previous
  published round (computed from the previous round's features) first, the lowest-entropy of them;
  then the other rows by entropy. A pair that survives a round of training is less likely to be an
  accident of one snapshot. Round 1 has no previous round: there it is the entropy rule. Measured:
  with k = 1 few neighbours survive a round (5-10% of rows on digits, 0.2-4% on CIFAR-10 10k), so
  the rule is nearly the entropy rule and changed neither consistency nor kNN beyond the spread.

In the last round of the progressive curriculum every row is an anchor and all rules agree
(``curriculum.anchor_count``'s ``max_fraction`` caps the count below N; every rule then decides).

``oracle`` is not a rule but a measuring instrument, and the one place labels reach a round's
neighbourhoods: the anchors are the entropy rule's, and each anchor's k neighbours are replaced by
its k nearest rows *of its own class* in the same features (``class_nearest``). Training with it
measures what a perfect neighbourhood rule could give at a budget: if even right neighbourhoods
do not lift kNN far above Instance, no label-free rule can. It is refused on a store without
labels, and is never a default or a method.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidParameterError

SELECTIONS = ("entropy", "mutual", "stable")  # the label-free rules
ORACLE = "oracle"
SELECTION_CHOICES = (*SELECTIONS, ORACLE)  # what a run may ask for: the rules and the label oracle


def check_selection(selection: str) -> None:
    if selection not in SELECTION_CHOICES:
        raise InvalidParameterError(f"selection must be one of {', '.join(SELECTION_CHOICES)}, got {selection!r}")


def class_nearest(features: np.ndarray, labels: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """(len(rows), k) int64: each row's k nearest rows of its own class by inner product, self
    excluded, nearest first (ties to the lower index). The ``oracle``'s neighbourhoods.

    features: (N, d) float32 unit rows (inner product = cosine, as the index ranks); labels: (N,) int;
    rows: the rows to answer for (default all), e.g. a round's anchors. Brute force per class in
    float64: exact, and at most (class size)^2 per class, which the measurement can afford.
    """
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise InvalidParameterError(f"features (N, d) and labels (N,) must match, got shapes {features.shape} "
                                    f"and {labels.shape}")
    rows = np.arange(features.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    neighbours = np.empty((rows.size, k), dtype=np.int64)
    for label in np.unique(labels[rows]):
        members = np.flatnonzero(labels == label)  # ascending, so a stable sort breaks ties by index
        if members.size <= k:
            raise InvalidParameterError(f"selection oracle needs more than k={k} rows of every class, class "
                                        f"{label} has {members.size}; lower --k")
        asking = np.flatnonzero(labels[rows] == label)
        similarity = features[rows[asking]].astype(np.float64) @ features[members].astype(np.float64).T
        similarity[np.arange(asking.size), np.searchsorted(members, rows[asking])] = -np.inf  # not itself
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        neighbours[asking] = members[order]
    return neighbours


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


def stable_nearest(neighbours: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """(N,) bool: row i's nearest neighbour neighbours[i, 0] is among its previous neighbours[i].

    neighbours: (N, k) int, this round's, nearest first; previous: (N, k') int, the previous
    published round's (k' may differ from k).
    """
    neighbours, previous = np.asarray(neighbours), np.asarray(previous)
    if neighbours.ndim != 2 or neighbours.shape[1] < 1:
        raise InvalidParameterError(f"neighbours must be an (N, k) array with k >= 1, got shape {neighbours.shape}")
    if previous.ndim != 2 or previous.shape[0] != neighbours.shape[0] or previous.shape[1] < 1:
        raise InvalidParameterError(f"previous neighbours must be an ({neighbours.shape[0]}, k) array, "
                                    f"got shape {previous.shape}")
    return (previous == neighbours[:, :1]).any(axis=1)


def preferred_rows(selection: str, mutual: np.ndarray, stable: np.ndarray | None) -> np.ndarray | None:
    """(N,) bool of the rows a rule takes first, or None when it ranks by entropy alone.

    mutual: (N,) bool, ``mutual_nearest`` of the round's neighbours (computed once per round);
    stable: (N,) bool, ``stable_nearest`` against the previous round, or None in round 1.
    """
    check_selection(selection)
    if selection == "mutual":
        return mutual
    if selection == "stable":
        return stable
    return None

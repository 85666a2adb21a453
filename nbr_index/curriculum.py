"""Curriculum selection (Eq 6) and neighbourhood class consistency (paper Fig 6).

Round r = 1..R of training uses anchors chosen from the memory bank after round r-1:
- ``progressive``: the floor(N r / R) LOWEST-entropy rows (ties -> lower index);
- ``oneoff``: all N rows for every round (the paper's Table 6 one-off selection);
- either capped at floor(N max_fraction) anchors (beyond the paper; 1 = no cap, the paper): the
  rows left out keep the instance loss even in the last round.
Labels are for reporting only; nothing here feeds them back into training.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InvalidParameterError

MODES = ("progressive", "oneoff")


def check_round(round: int, rounds: int) -> None:
    """Raise InvalidParameterError unless rounds >= 1 and 1 <= round <= rounds."""
    if not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise InvalidParameterError(f"rounds (R) must be an integer >= 1, got {rounds!r}")
    if not isinstance(round, (int, np.integer)) or not 1 <= round <= rounds:
        raise InvalidParameterError(
            f"round must be in 1..{rounds} (round 0 trains without neighbourhoods), got {round!r}"
        )


def check_max_fraction(max_fraction: float) -> None:
    """Raise InvalidParameterError unless 0 < max_fraction <= 1."""
    if not isinstance(max_fraction, (int, float, np.floating)) or not 0.0 < float(max_fraction) <= 1.0:
        raise InvalidParameterError(f"max anchor fraction must be in (0, 1] (1: no cap, the paper), got {max_fraction!r}")


def anchor_count(n: int, round: int, rounds: int, mode: str = "progressive", max_fraction: float = 1.0) -> int:
    """Number of anchors of round ``round``: floor(N round / rounds), or N for ``oneoff``; at most
    floor(N max_fraction)."""
    check_round(round, rounds)
    if mode not in MODES:
        raise InvalidParameterError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_max_fraction(max_fraction)
    count = n if mode == "oneoff" else (n * round) // rounds
    # floor(N f), forgiving float error: 0.29 * 100 is 28.999999999999996 in binary and means 29.
    return min(count, math.floor(n * float(max_fraction) + 1e-9))


def select_anchors(entropy: np.ndarray, round: int, rounds: int, mode: str = "progressive",
                   preferred: np.ndarray | None = None, max_fraction: float = 1.0) -> np.ndarray:
    """(N,) bool: the anchor_count lowest-entropy rows; equal entropies go to the lower index.

    entropy: (N,) float. preferred: (N,) bool rows to take before all others (a selection rule,
    ``nbr_index.selection``), each group by entropy; None: entropy alone (the paper).
    max_fraction: the cap of ``anchor_count``.
    """
    entropy = np.asarray(entropy)
    if entropy.ndim != 1:
        raise InvalidParameterError(f"entropy must be a 1-D (N,) array, got shape {entropy.shape}")
    if not np.isfinite(entropy).all():
        bad = int(np.nonzero(~np.isfinite(entropy))[0][0])
        raise InvalidParameterError(f"entropy of row {bad} is not finite ({entropy[bad]})")
    count = anchor_count(entropy.size, round, rounds, mode, max_fraction)
    if preferred is None:
        # A stable sort keeps equal entropies in index order, so the lower index is taken first.
        lowest = np.argsort(entropy, kind="stable")[:count]
    else:
        preferred = np.asarray(preferred, dtype=bool)
        if preferred.shape != entropy.shape:
            raise InvalidParameterError(f"preferred must be (N,) = {entropy.shape}, got {preferred.shape}")
        # lexsort sorts by its last key first and is stable: preferred rows, then by entropy, then index.
        lowest = np.lexsort((entropy, ~preferred))[:count]
    anchor = np.zeros(entropy.size, dtype=bool)
    anchor[lowest] = True
    return anchor


def neighbour_label_agreement(neighbours: np.ndarray, anchor: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(A, k) bool: for each anchor (in row order), which of its neighbours share its label.

    neighbours: (N, k) int64; anchor: (N,) bool; labels: (N,) int.
    """
    neighbours, anchor, labels = np.asarray(neighbours), np.asarray(anchor, dtype=bool), np.asarray(labels)
    if not (neighbours.shape[0] == anchor.shape[0] == labels.shape[0]):
        raise InvalidParameterError(
            f"neighbours ({neighbours.shape[0]} rows), anchor ({anchor.shape[0]}) and labels "
            f"({labels.shape[0]}) must cover the same N samples"
        )
    anchor_rows = np.nonzero(anchor)[0]
    return labels[neighbours[anchor_rows]] == labels[anchor_rows][:, None]


def neighbourhood_consistency(neighbours: np.ndarray, anchor: np.ndarray, labels: np.ndarray) -> float:
    """Percent of anchors whose k neighbours ALL share the anchor's label (NaN if no anchors)."""
    agreement = neighbour_label_agreement(neighbours, anchor, labels)
    if agreement.shape[0] == 0:
        return math.nan
    return 100.0 * float(agreement.all(axis=1).mean())


def pair_consistency(neighbours: np.ndarray, anchor: np.ndarray, labels: np.ndarray) -> float:
    """Percent of (anchor, neighbour) pairs that share a label (NaN if no anchors)."""
    agreement = neighbour_label_agreement(neighbours, anchor, labels)
    if agreement.size == 0:
        return math.nan
    return 100.0 * float(agreement.mean())

"""Curriculum selection (Eq 6) and neighbourhood consistency on hand-built values."""

import math

import numpy as np
import pytest

from nbr_index import InvalidParameterError, anchor_count, pair_consistency, neighbourhood_consistency, select_anchors


def test_progressive_counts_are_floor_of_n_r_over_R():
    entropy = np.random.default_rng(0).random(10)
    counts = [int(select_anchors(entropy, r, 4).sum()) for r in range(1, 5)]
    assert counts == [2, 5, 7, 10]  # floor(10 r / 4)
    assert [anchor_count(7, r, 3) for r in (1, 2, 3)] == [2, 4, 7]


def test_anchors_are_the_lowest_entropy_rows():
    entropy = np.array([5.0, 1.0, 4.0, 0.5, 3.0, 2.0, 6.0, 7.0])
    anchor = select_anchors(entropy, 1, 2)  # floor(8 / 2) = 4 anchors
    assert np.nonzero(anchor)[0].tolist() == [1, 3, 4, 5]


def test_equal_entropies_go_to_the_lower_index():
    entropy = np.array([2.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=np.float32)
    # 3 anchors: row 5 (0.0), then two of the four 1.0 rows: the lowest indices 1 and 2.
    assert np.nonzero(select_anchors(entropy, 1, 2))[0].tolist() == [1, 2, 5]


def test_oneoff_selects_every_row_every_round():
    entropy = np.arange(9.0)
    for r in (1, 2, 3):
        assert select_anchors(entropy, r, 3, mode="oneoff").all()


@pytest.mark.parametrize("round_, rounds", [(0, 4), (5, 4), (1, 0)])
def test_rounds_outside_one_to_R_are_refused(round_, rounds):
    with pytest.raises(InvalidParameterError, match="round"):
        select_anchors(np.zeros(4), round_, rounds)


def test_unknown_mode_and_nan_entropy_are_refused():
    with pytest.raises(InvalidParameterError, match="mode must be"):
        select_anchors(np.zeros(4), 1, 4, mode="all")
    with pytest.raises(InvalidParameterError, match="row 2"):
        select_anchors(np.array([0.0, 1.0, np.nan]), 1, 1)


def test_consistency_counts_anchors_whose_neighbours_all_share_the_label():
    labels = np.array([0, 0, 1, 1, 0])
    neighbours = np.array([[1, 4], [0, 2], [3, 0], [2, 1], [0, 1]])
    anchor = np.array([True, True, True, False, False])
    # anchor 0: neighbours 1, 4 -> labels 0, 0: consistent; anchor 1: 0, 2 -> 0, 1: not;
    # anchor 2: 3, 0 -> 1, 0: not. One of three anchors; four of six pairs.
    assert neighbourhood_consistency(neighbours, anchor, labels) == pytest.approx(100 / 3)
    assert pair_consistency(neighbours, anchor, labels) == pytest.approx(100 * 4 / 6)
    assert math.isnan(neighbourhood_consistency(neighbours, np.zeros(5, dtype=bool), labels))

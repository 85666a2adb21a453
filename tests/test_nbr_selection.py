"""Anchor selection rules (nbr_index.selection): hand-built values, a real rebuild against brute
force, the CLI flag, and a trainer run that records the rule."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from nbr_index import InvalidParameterError, mutual_nearest, rebuild, select_anchors
from nbr_index.reference import brute_force_knn_entropy
from storage import Store
from tests.helpers import one_line_error, unit_rows

N, DIM = 600, 16


def test_mutual_nearest_on_hand_built_neighbours():
    # k = 1: 0 <-> 1 pick each other; 2 -> 1, 3 -> 2, 4 -> 3 are one-way.
    assert mutual_nearest(np.array([[1], [0], [1], [2], [3]])).tolist() == [True, True, False, False, False]
    # k = 2: i counts when it is among the 2 nearest of its nearest neighbour (the first column).
    neighbours = np.array([[1, 2], [2, 0], [0, 1], [2, 0]])
    # 0 -> 1 whose 2 nearest are (2, 0): yes. 1 -> 2: (0, 1) yes. 2 -> 0: (1, 2) yes. 3 -> 2: (0, 1) no.
    assert mutual_nearest(neighbours).tolist() == [True, True, True, False]
    with pytest.raises(InvalidParameterError, match=r"\(N, k\) array"):
        mutual_nearest(np.array([1, 0]))


def test_preferred_rows_fill_the_places_first_each_group_by_entropy():
    entropy = np.array([0.1, 0.5, 0.2, 0.3, 0.05, 0.3])
    preferred = np.array([False, True, False, True, False, True])
    # 3 places (round 1 of 2, 6 rows): the three preferred rows, though 4 and 0 have lower entropy.
    assert np.nonzero(select_anchors(entropy, 1, 2, preferred=preferred))[0].tolist() == [1, 3, 5]
    # 2 places (round 1 of 3): the two lowest-entropy preferred rows, the tie to the lower index.
    assert np.nonzero(select_anchors(entropy, 1, 3, preferred=preferred))[0].tolist() == [3, 5]
    # 5 places (round 5 of 6): all 3 preferred, then the others by entropy: 4 (0.05), 0 (0.1).
    assert np.nonzero(select_anchors(entropy, 5, 6, preferred=preferred))[0].tolist() == [0, 1, 3, 4, 5]
    # No preference: the paper's rule.
    assert np.nonzero(select_anchors(entropy, 1, 3))[0].tolist() == [0, 4]
    with pytest.raises(InvalidParameterError, match="preferred must be"):
        select_anchors(entropy, 1, 3, preferred=preferred[:3])


@pytest.fixture
def store(tmp_path):
    store = Store.create_or_open(str(tmp_path / "store"), n=N, dim=DIM, dataset_id="test", chunk_rows=128,
                                 curriculum={"rounds": 3, "k": 2, "tau": 0.1, "mode": "progressive"})
    store.write_features(0, unit_rows(N, DIM))
    store.write_labels((np.arange(N) % 5).astype(np.int64))
    return store


def expected_anchors(rule: str, count: int) -> np.ndarray:
    """The anchors a rule picks, from float64 brute force, written out independently of nbr_index."""
    neighbours, _, entropy = brute_force_knn_entropy(unit_rows(N, DIM), 2, 0.1)
    mutual = np.array([i in neighbours[neighbours[i, 0]] for i in range(N)])
    key = [(0 if (rule == "mutual" and mutual[i]) else 1, entropy[i], i) for i in range(N)]
    return np.array(sorted(i for *_, i in sorted(key)[:count]))


@pytest.mark.parametrize("rule", ["entropy", "mutual"])
def test_a_rebuild_selects_by_the_rule_and_records_it(store, rule):
    result = rebuild(store, 1, selection=rule)
    published = store.read_neighbourhoods(1)
    assert np.nonzero(published.anchor)[0].tolist() == expected_anchors(rule, N // 3).tolist()
    assert published.attrs["selection"] == rule and result.attrs["anchors"] == N // 3
    neighbours = np.asarray(published.neighbours)
    mutual = np.array([i in neighbours[neighbours[i, 0]] for i in range(N)])
    assert published.attrs["mutual_fraction"] == pytest.approx(mutual.mean())
    assert "selection=" + rule in result.summary()


def test_the_rules_differ_and_the_store_curriculum_chooses_by_default(tmp_path):
    store = Store.create_or_open(str(tmp_path / "s"), n=N, dim=DIM, dataset_id="test",
                                 curriculum={"rounds": 3, "k": 2, "tau": 0.1, "mode": "progressive",
                                             "selection": "mutual"})
    store.write_features(0, unit_rows(N, DIM))
    assert rebuild(store, 1).attrs["selection"] == "mutual"
    mutual, entropy = expected_anchors("mutual", N // 3), expected_anchors("entropy", N // 3)
    assert np.nonzero(store.read_neighbourhoods(1).anchor)[0].tolist() == mutual.tolist()
    assert len(set(mutual) ^ set(entropy)) > 0, "the test data must tell the rules apart"


def test_an_unknown_rule_is_one_line_and_publishes_nothing(store):
    with pytest.raises(InvalidParameterError, match="selection must be one of entropy, mutual, got 'margin'"):
        rebuild(store, 1, selection="margin")
    assert store.published_rounds() == []


def test_the_cli_takes_the_rule(store):
    from nbr_index.cli import main

    result = CliRunner().invoke(main, ["rebuild", "--store", store.url, "--round", "1", "--selection", "mutual",
                                       "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["selection"] == "mutual"
    assert np.nonzero(store.read_neighbourhoods(1).anchor)[0].tolist() == expected_anchors("mutual", N // 3).tolist()


def test_a_trainer_run_with_the_mutual_rule_records_it_and_keeps_the_curriculum_count(tmp_path):
    from trainer.cli import main

    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--run-dir", str(run), "--rounds", "2", "--epochs-per-round", "1",
                                       "--eval-every", "0", "--selection", "mutual"])
    assert result.exit_code == 0, result.output + result.stderr
    store = Store.open(str(run / "store"))
    assert store.info.curriculum["selection"] == "mutual"
    summary = json.loads((run / "summary.json").read_text())
    assert [r["anchors"] for r in summary["rounds"]] == [0, 750, 1500]
    round_1 = store.read_neighbourhoods(1)
    assert round_1.attrs["selection"] == "mutual"
    mutual = mutual_nearest(np.asarray(round_1.neighbours))
    anchors = np.asarray(round_1.anchor)
    # Every mutual row is an anchor before any other row is (750 places, fewer mutual rows).
    assert mutual.sum() < 750 and anchors[mutual].all()
    bad = CliRunner().invoke(main, ["run", "--run-dir", str(tmp_path / "bad"), "--selection", "margin"])
    one_line_error(bad, "unknown selection 'margin': choose one of entropy, mutual")
    assert not (tmp_path / "bad").exists()

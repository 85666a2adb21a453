"""Anchor selection rules (nbr_index.selection): hand-built values, a real rebuild against brute
force, the CLI flag, and a trainer run that records the rule."""

import json

import click
import numpy as np
import pytest
from click.testing import CliRunner

from nbr_index import (FeaturesNotReadyError, InvalidParameterError, anchor_count, class_nearest, mutual_nearest,
                       rebuild, select_anchors, stable_nearest)
from nbr_index.reference import brute_force_knn_entropy
from storage import Store, format_description
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


def test_stable_nearest_on_hand_built_neighbours():
    now = np.array([[1, 2], [2, 0], [0, 1], [2, 0]])
    # Row i is stable when its nearest neighbour now (first column) is among its previous k' ones.
    previous = np.array([[3], [2], [1], [0]])
    assert stable_nearest(now, previous).tolist() == [False, True, False, False]
    previous = np.array([[2, 1, 3], [0, 3, 2], [3, 1, 0], [1, 0, 3]])
    assert stable_nearest(now, previous).tolist() == [True, True, True, False]
    with pytest.raises(InvalidParameterError, match=r"previous neighbours must be an \(4, k\) array"):
        stable_nearest(now, previous[:3])


def test_the_anchor_cap_bounds_every_round_and_is_checked():
    assert [anchor_count(1500, r, 4, max_fraction=0.75) for r in (1, 2, 3, 4)] == [375, 750, 1125, 1125]
    assert [anchor_count(100, r, 4, max_fraction=0.29) for r in (1, 2)] == [25, 29]
    assert anchor_count(1500, 1, 4, "oneoff", max_fraction=0.5) == 750
    assert anchor_count(1500, 4, 4, max_fraction=1.0) == 1500
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InvalidParameterError, match=r"max anchor fraction must be in \(0, 1\]"):
            anchor_count(1500, 1, 4, max_fraction=bad)
    entropy = np.array([0.4, 0.1, 0.3, 0.2])
    assert np.nonzero(select_anchors(entropy, 2, 2, max_fraction=0.5))[0].tolist() == [1, 3]


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


def expected_anchors(rule: str, count: int, features=None, previous=None) -> np.ndarray:
    """The anchors a rule picks, from float64 brute force, written out independently of nbr_index.
    previous: (N, k) the previous round's neighbours (the stable rule)."""
    neighbours, _, entropy = brute_force_knn_entropy(unit_rows(N, DIM) if features is None else features, 2, 0.1)
    first = {"mutual": [i in neighbours[neighbours[i, 0]] for i in range(N)],
             "stable": [previous is not None and neighbours[i, 0] in previous[i] for i in range(N)],
             "entropy": [False] * N}[rule]
    key = [(0 if first[i] else 1, entropy[i], i) for i in range(N)]
    return np.array(sorted(i for *_, i in sorted(key)[:count]))


def drifted(features: np.ndarray, amount: float, seed: int) -> np.ndarray:
    """(N, d) unit rows: ``features`` moved by ``amount`` of fresh noise (the next round's bank)."""
    moved = features + amount * unit_rows(*features.shape, seed=seed)
    return (moved / np.linalg.norm(moved, axis=1, keepdims=True)).astype(np.float32)


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


def test_the_stable_rule_prefers_neighbours_that_survived_the_round(store):
    first_round = rebuild(store, 1, selection="stable")
    # Round 1 has no previous round: the stable rule is the paper's there.
    assert np.nonzero(first_round.anchor)[0].tolist() == expected_anchors("entropy", N // 3).tolist()
    assert "stable_fraction" not in first_round.attrs
    features = drifted(unit_rows(N, DIM), 0.3, seed=1)
    store.write_features(1, features)
    result = rebuild(store, 2, selection="stable")
    previous = np.asarray(store.read_neighbourhoods(1).neighbours)
    expected = expected_anchors("stable", 2 * N // 3, features, previous)
    assert np.nonzero(result.anchor)[0].tolist() == expected.tolist()
    now, _, _ = brute_force_knn_entropy(features, 2, 0.1)
    stable = np.array([now[i, 0] in previous[i] for i in range(N)])
    assert 0.05 < stable.mean() < 0.95, "the test data must have stable and unstable rows"
    assert result.attrs["stable_fraction"] == pytest.approx(stable.mean())
    assert len(set(expected) ^ set(expected_anchors("entropy", 2 * N // 3, features))) > 0


def test_the_stable_rule_without_the_previous_round_is_one_line_and_publishes_nothing(store):
    store.write_features(1, drifted(unit_rows(N, DIM), 0.3, seed=1))
    with pytest.raises(FeaturesNotReadyError, match="compares with neighbourhoods round 1, which is not published"):
        rebuild(store, 2, selection="stable")
    assert store.published_rounds() == []
    assert "stable_fraction" not in rebuild(store, 2).attrs  # the entropy rule needs no previous round


def test_a_capped_rebuild_keeps_the_lowest_entropy_rows_and_records_the_cap(store):
    for r in (1, 2):
        store.write_features(r, unit_rows(N, DIM))
    with pytest.raises(InvalidParameterError, match="max anchor fraction"):
        rebuild(store, 3, max_anchor_fraction=1.5)
    assert store.published_rounds() == []
    result = rebuild(store, 3, max_anchor_fraction=0.5)
    assert np.nonzero(result.anchor)[0].tolist() == expected_anchors("entropy", N // 2).tolist()
    assert result.attrs["max_anchor_fraction"] == 0.5 and store.read_neighbourhoods(3).attrs["fraction"] == 0.5


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
    with pytest.raises(InvalidParameterError, match="selection must be one of entropy, mutual, stable, oracle, got 'margin'"):
        rebuild(store, 1, selection="margin")
    assert store.published_rounds() == []


def test_the_cli_takes_the_rule(store):
    from nbr_index.cli import main

    # The store's trainer selects by the mutual rule (the CLI refuses a rule the curriculum does not name).
    Store.create_or_open(store.url, n=N, dim=DIM, dataset_id="test",
                         curriculum={"rounds": 3, "k": 2, "tau": 0.1, "mode": "progressive", "selection": "mutual"})
    result = CliRunner().invoke(main, ["rebuild", "--store", store.url, "--round", "1", "--selection", "mutual",
                                       "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["selection"] == "mutual"
    assert np.nonzero(store.read_neighbourhoods(1).anchor)[0].tolist() == expected_anchors("mutual", N // 3).tolist()


def short_trainer_run(run, *flags) -> tuple[Store, dict]:
    """``trainer run`` on digits, 2 + 1 rounds of 1 epoch, no per-epoch kNN, with ``flags``: the
    run's store and summary."""
    from trainer.cli import main

    result = CliRunner().invoke(main, ["run", "--run-dir", str(run), "--rounds", "2", "--epochs-per-round", "1",
                                       "--eval-every", "0", *flags])
    assert result.exit_code == 0, result.output + result.stderr
    return Store.open(str(run / "store")), json.loads((run / "summary.json").read_text())


def test_a_trainer_run_with_the_mutual_rule_records_it_and_keeps_the_curriculum_count(tmp_path):
    from trainer.cli import main

    store, summary = short_trainer_run(tmp_path / "run", "--selection", "mutual")
    assert store.info.curriculum["selection"] == "mutual"
    assert [r["anchors"] for r in summary["rounds"]] == [0, 750, 1500]
    round_1 = store.read_neighbourhoods(1)
    assert round_1.attrs["selection"] == "mutual"
    mutual = mutual_nearest(np.asarray(round_1.neighbours))
    anchors = np.asarray(round_1.anchor)
    # Every mutual row is an anchor before any other row is (750 places, fewer mutual rows).
    assert mutual.sum() < 750 and anchors[mutual].all()
    bad = CliRunner().invoke(main, ["run", "--run-dir", str(tmp_path / "bad"), "--selection", "margin"])
    one_line_error(bad, "unknown selection 'margin': choose one of entropy, mutual, stable, oracle")
    assert not (tmp_path / "bad").exists()


def test_a_capped_trainer_run_records_the_cap_and_never_passes_it(tmp_path):
    from trainer.cli import main

    store, summary = short_trainer_run(tmp_path / "run", "--selection", "stable", "--max-anchor-fraction", "0.5")
    assert store.info.curriculum["max_anchor_fraction"] == 0.5 and store.info.curriculum["selection"] == "stable"
    # 1,500 digits, R = 2: 750 anchors in round 1, and 750 (not 1,500) in round 2, the stable rule's.
    assert [r["anchors"] for r in summary["rounds"]] == [0, 750, 750]
    round_2 = store.read_neighbourhoods(2)
    assert round_2.attrs["selection"] == "stable" and 0.0 < round_2.attrs["stable_fraction"] < 1.0
    stable = stable_nearest(np.asarray(round_2.neighbours), np.asarray(store.read_neighbourhoods(1).neighbours))
    anchors = np.asarray(round_2.anchor)
    assert anchors[stable].all() if stable.sum() <= 750 else stable[anchors].all()
    bad = CliRunner().invoke(main, ["run", "--run-dir", str(tmp_path / "bad"), "--max-anchor-fraction", "0"])
    one_line_error(bad, "--max-anchor-fraction must be above 0 (1: no cap, the paper), got 0.0")
    assert not (tmp_path / "bad").exists()


def test_the_selection_replay_bench_measures_every_rule_on_one_runs_banks(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "selection_consistency.py"
    spec = importlib.util.spec_from_file_location("selection_consistency", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    store = Store.create_or_open(str(tmp_path / "s"), n=N, dim=DIM, dataset_id="test", chunk_rows=128,
                                 curriculum={"rounds": 3, "k": 2, "tau": 0.1, "mode": "progressive"})
    banks = [unit_rows(N, DIM), drifted(unit_rows(N, DIM), 0.3, seed=1)]
    for r, bank in enumerate(banks):
        store.write_features(r, bank)
    labels = (np.arange(N) % 5).astype(np.int64)
    store.write_labels(labels)
    rows = bench.replay(store)
    assert [row["round"] for row in rows] == [1, 2] and [row["anchors"] for row in rows] == [N // 3, 2 * N // 3]
    first, _, _ = brute_force_knn_entropy(banks[0], 2, 0.1)
    second, _, _ = brute_force_knn_entropy(banks[1], 2, 0.1)
    for row, bank, neighbours, previous in ((rows[0], banks[0], first, None), (rows[1], banks[1], second, first)):
        for rule in ("entropy", "mutual", "stable"):
            anchor = np.zeros(N, dtype=bool)
            anchor[expected_anchors(rule, row["anchors"], bank, previous)] = True
            all_agree = (labels[neighbours[anchor]] == labels[anchor][:, None]).all(axis=1)
            assert row[rule] == pytest.approx(100 * all_agree.mean())
        every = (labels[neighbours] == labels[:, None]).all(axis=1)
        assert row["all rows"] == pytest.approx(100 * every.mean())
    assert rows[0]["stable rows"] is None and rows[1]["stable rows"] > 0


def brute_force_class_nearest(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(N, k): row by row, the k most similar other rows of the same label, float64, ties to the lower index."""
    features = features.astype(np.float64)
    out = []
    for i in range(len(labels)):
        same = [j for j in range(len(labels)) if labels[j] == labels[i] and j != i]
        out.append(sorted(same, key=lambda j: (-float(features[i] @ features[j]), j))[:k])
    return np.array(out)


def test_class_nearest_equals_a_row_by_row_brute_force_and_checks_its_input():
    features, labels = unit_rows(200, 8, seed=3), (np.arange(200) * 7 % 4).astype(np.int64)
    expected = brute_force_class_nearest(features, labels, 3)
    assert class_nearest(features, labels, 3).tolist() == expected.tolist()
    rows = np.array([5, 0, 199, 42])
    assert class_nearest(features, labels, 3, rows).tolist() == expected[rows].tolist()
    assert (labels[expected] == labels[:, None]).all() and (expected != np.arange(200)[:, None]).all()
    with pytest.raises(InvalidParameterError, match="class 1 has 2; lower --k"):
        class_nearest(features[:6], np.array([0, 0, 0, 0, 1, 1]), 2)
    with pytest.raises(InvalidParameterError, match="must match"):
        class_nearest(features, labels[:10], 1)


def test_the_oracle_keeps_the_entropy_anchors_and_gives_them_their_own_class_neighbours(store):
    labels = (np.arange(N) % 5).astype(np.int64)
    result = rebuild(store, 1, selection="oracle")
    published = store.read_neighbourhoods(1)
    anchor = np.asarray(published.anchor)
    assert np.nonzero(anchor)[0].tolist() == expected_anchors("entropy", N // 3).tolist()
    found, _, _ = brute_force_knn_entropy(unit_rows(N, DIM), 2, 0.1)
    neighbours = np.asarray(published.neighbours)
    assert neighbours[anchor].tolist() == brute_force_class_nearest(unit_rows(N, DIM), labels, 2)[anchor].tolist()
    assert neighbours[~anchor].tolist() == found[~anchor].tolist()  # what the features found, untouched
    found_agree = (labels[found[anchor]] == labels[anchor][:, None]).all(axis=1)
    assert published.attrs["found_consistency"] == pytest.approx(100 * found_agree.mean())
    assert published.attrs["found_consistency"] < 50 and published.attrs["consistency"] == 100.0
    assert published.attrs["selection"] == "oracle" and "found consistency" in result.summary()
    assert f"found {published.attrs['found_consistency']:.1f}%" in format_description(store.describe())  # inspect


def test_the_oracle_without_labels_is_one_line_and_publishes_nothing(tmp_path):
    from nbr_index.cli import main

    store = Store.create_or_open(str(tmp_path / "s"), n=N, dim=DIM, dataset_id="test",
                                 curriculum={"rounds": 3, "k": 2, "tau": 0.1, "mode": "progressive",
                                             "selection": "oracle"})
    store.write_features(0, unit_rows(N, DIM))
    bad = CliRunner().invoke(main, ["rebuild", "--store", store.url, "--round", "1", "--selection", "oracle"])
    one_line_error(bad, "selection oracle replaces the anchors' neighbours by their own class's, but store")
    assert store.published_rounds() == []


def test_a_trainer_run_with_the_oracle_trains_on_own_class_neighbourhoods(tmp_path):
    store, summary = short_trainer_run(tmp_path / "run", "--selection", "oracle")
    assert [r["anchors"] for r in summary["rounds"]] == [0, 750, 1500]
    assert [r["consistency"] for r in summary["rounds"][1:]] == [100.0, 100.0]
    labels = store.read_labels()
    for r in (1, 2):
        attrs = store.read_neighbourhoods(r).attrs
        assert attrs["selection"] == "oracle" and 0.0 < attrs["found_consistency"] < 100.0
    round_1 = store.read_neighbourhoods(1)
    anchors = np.flatnonzero(round_1.anchor)
    bank = store.feature_reader(0).read_all()
    assert np.asarray(round_1.neighbours)[anchors].tolist() == class_nearest(bank, labels, 1, anchors).tolist()


def test_the_class_geometry_bench_equals_pair_by_pair_cosines_on_a_real_store(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "class_geometry.py"
    spec = importlib.util.spec_from_file_location("class_geometry", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n, labels = 90, (np.arange(90) * 7 % 3).astype(np.int64)
    store = Store.create_or_open(str(tmp_path / "s"), n=n, dim=DIM, dataset_id="test", chunk_rows=32)
    centres = unit_rows(3, DIM, seed=5)
    banks = [unit_rows(n, DIM, seed=4), drifted(centres[labels], 0.5, seed=6)]  # round 1: classes cluster
    for r, bank in enumerate(banks):
        store.write_features(r, 3.0 * bank)   # any norm: the bench normalises
    store.write_labels(labels)
    rows = bench.store_geometry(store)
    assert [row["round"] for row in rows] == [0, 1]
    for row in rows:
        stored = store.feature_reader(row["round"]).read_all().astype(np.float64)
        unit = stored / np.linalg.norm(stored, axis=1, keepdims=True)
        cos = unit @ unit.T
        same = labels[:, None] == labels[None, :]
        off_diagonal = ~np.eye(n, dtype=bool)
        nearest = np.where(same & off_diagonal, cos, -np.inf).max(axis=1).mean()
        assert row["nearest own-class"] == pytest.approx(nearest, abs=1e-6)
        assert row["same class"] == pytest.approx(cos[same & off_diagonal].mean(), abs=1e-9)
        assert row["different class"] == pytest.approx(cos[~same].mean(), abs=1e-9)
        assert row["class gap"] == pytest.approx(row["same class"] - row["different class"])
    assert rows[1]["class gap"] > rows[0]["class gap"] + 0.2   # the clustered round stands apart
    printed = CliRunner().invoke(bench.main, ["--store", str(tmp_path / "s"), "--json-out", str(tmp_path / "g.json")])
    assert printed.exit_code == 0, printed.output
    assert f"| {tmp_path / 's'} | 1 | {rows[1]['nearest own-class']:.3f} |" in printed.output
    assert json.loads((tmp_path / "g.json").read_text()) == {str(tmp_path / "s"): rows}
    unlabelled = Store.create_or_open(str(tmp_path / "u"), n=n, dim=DIM, dataset_id="test", chunk_rows=32)
    unlabelled.write_features(0, banks[0])
    with pytest.raises(click.ClickException, match="holds no labels"):
        bench.store_geometry(unlabelled)

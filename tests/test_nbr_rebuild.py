"""rebuild() through a real store: what it publishes, idempotence, chunked == in-memory, refusals."""

import numpy as np
import pytest

from nbr_index import FeaturesNotReadyError, InvalidFeaturesError, InvalidParameterError, rebuild
from nbr_index.reference import brute_force_knn_entropy
from storage import Store
from tests.helpers import unit_rows

N, DIM = 600, 16
CURRICULUM = {"rounds": 3, "k": 2, "tau": 0.1, "mode": "progressive"}


@pytest.fixture
def store(tmp_path):
    store = Store.create_or_open(str(tmp_path / "store"), n=N, dim=DIM, dataset_id="test", curriculum=CURRICULUM,
                                 chunk_rows=128)
    store.write_features(0, unit_rows(N, DIM))
    return store


def test_rebuild_publishes_the_exact_round_with_its_attrs(store):
    labels = np.arange(N) % 5
    store.write_labels(labels.astype(np.int64))
    result = rebuild(store, 1)
    assert result.published
    neighbours, _, entropy = brute_force_knn_entropy(unit_rows(N, DIM), 2, 0.1)
    published = store.read_neighbourhoods(1)
    np.testing.assert_array_equal(published.neighbours, neighbours)
    np.testing.assert_allclose(published.entropy, entropy, rtol=2e-6)
    lowest = np.argsort(entropy, kind="stable")[: N // 3]
    assert np.nonzero(published.anchor)[0].tolist() == sorted(lowest.tolist())
    attrs = published.attrs
    assert {key: attrs[key] for key in ("round", "k", "tau", "mode", "source_features_round", "backend", "device")} == {
        "round": 1, "k": 2, "tau": 0.1, "mode": "progressive", "source_features_round": 0, "backend": "torch",
        "device": "cpu",
    }
    assert attrs["anchors"] == N // 3 and attrs["fraction"] == pytest.approx(1 / 3) and attrs["seconds"] > 0
    anchors = np.nonzero(published.anchor)[0]
    expected = 100 * np.mean([(labels[neighbours[i]] == labels[i]).all() for i in anchors])
    assert attrs["consistency"] == pytest.approx(expected)


def test_rebuild_is_idempotent(store):
    first = rebuild(store, 1)
    again = rebuild(store, 1, k=5, backend="faiss")  # different settings: the published round stands
    assert first.published and not again.published
    assert again.attrs["checksum"] == store.read_neighbourhoods(1).attrs["checksum"]
    assert again.attrs["k"] == 2 and again.attrs["seconds"] == first.attrs["seconds"]
    np.testing.assert_array_equal(again.neighbours, first.neighbours)
    assert store.published_rounds() == [1]


def test_a_chunked_rebuild_publishes_what_an_in_memory_one_does(tmp_path, store):
    in_memory = rebuild(store, 1, in_memory_bytes=1 << 30)
    other = Store.create_or_open(str(tmp_path / "other"), n=N, dim=DIM, dataset_id="test", curriculum=CURRICULUM,
                                 chunk_rows=128)
    other.write_features(0, unit_rows(N, DIM))
    chunked = rebuild(other, 1, in_memory_bytes=0, chunk_read_rows=256)
    a, b = store.read_neighbourhoods(1), other.read_neighbourhoods(1)
    np.testing.assert_array_equal(a.neighbours, b.neighbours)
    np.testing.assert_array_equal(a.anchor, b.anchor)
    np.testing.assert_allclose(a.entropy, b.entropy, rtol=1e-6)
    assert in_memory.published and chunked.published


def test_oneoff_mode_and_parameter_overrides(store):
    result = rebuild(store, 1, mode="oneoff", k=1, tau=0.05)
    assert result.anchor.all() and result.attrs["k"] == 1 and result.attrs["tau"] == 0.05
    assert result.neighbours.shape == (N, 1)


def test_missing_or_incomplete_features_name_the_round_waited_for(store):
    with pytest.raises(FeaturesNotReadyError, match=r"round 2 waits for features round 1.*complete feature rounds: \[0\]"):
        rebuild(store, 2)
    store.prepare_features(1)
    store.write_feature_chunks(1, unit_rows(N, DIM, seed=1), rank=0, world_size=2)  # half the chunks
    with pytest.raises(FeaturesNotReadyError, match="waits for features round 1"):
        rebuild(store, 2)
    assert store.published_rounds() == []


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(round=0), "round must be in 1..3"),
        (dict(round=4), "round must be in 1..3"),
        (dict(round=1, rounds=0), r"rounds \(R\) must be an integer >= 1"),
        (dict(round=1, k=N), "k must satisfy"),
        (dict(round=1, tau=0.0), "tau must be"),
        (dict(round=1, mode="sometimes"), "mode must be"),
    ],
)
def test_bad_parameters_publish_nothing(store, arguments, message):
    with pytest.raises(InvalidParameterError, match=message):
        rebuild(store, **arguments)
    assert store.published_rounds() == []


def test_nan_features_publish_nothing(store):
    rows = unit_rows(N, DIM, seed=4)
    rows[321] = np.nan
    store.write_features(1, rows)
    rebuild(store, 1)
    with pytest.raises(InvalidFeaturesError, match="feature row 321 contains NaN"):
        rebuild(store, 2)
    assert store.published_rounds() == [1]

"""Round trips through a real store: a local directory (publish by rename) and ``memory://``
(publish in place, complete flag last), plus opening rules and queries."""

import json

import numpy as np
import pytest

from storage import FeatureReader, Store, StoreError, UserError, format_description

N, DIM, CHUNK = 3000, 16, 512          # 6 chunks, the last one short (440 rows)
CURRICULUM = {"rounds": 4, "k": 2, "tau": 0.1, "mode": "progressive"}


def make_bank(seed: int) -> np.ndarray:
    bank = np.random.default_rng(seed).standard_normal((N, DIM)).astype(np.float32)
    return bank / np.linalg.norm(bank, axis=1, keepdims=True)


def make_round(seed: int, k: int = 2):
    rng = np.random.default_rng(seed)
    neighbours = rng.integers(0, N, size=(N, k), dtype=np.int64)
    entropy = rng.random(N, dtype=np.float32)
    anchor = entropy < np.quantile(entropy, 0.25)
    attrs = {"tau": 0.1, "fraction": 0.25, "mode": "progressive", "source_features_round": 0,
             "backend": "torch", "seconds": 0.5, "consistency": 81.5}
    return neighbours, entropy, anchor, attrs


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path, memory_store_url):
    return str(tmp_path / "store") if request.param == "local" else memory_store_url


def test_features_round_trip(url):
    store = Store.create_or_open(url, N, DIM, "toy-v1", CURRICULUM, chunk_rows=CHUNK)
    assert store.complete_feature_rounds() == [] and store.latest_complete_features() is None
    bank0, bank2 = make_bank(0), make_bank(2)
    checksum0 = store.write_features(0, bank0)
    checksum2 = store.write_features(2, bank2)
    assert checksum0 != checksum2 and len(checksum0) == 64

    reopened = Store.open(url)
    assert reopened.info.n == N and reopened.info.dim == DIM and reopened.info.chunk_rows == CHUNK
    assert reopened.info.dataset_id == "toy-v1" and reopened.info.curriculum == CURRICULUM
    assert reopened.complete_feature_rounds() == [0, 2]
    assert reopened.latest_complete_features() == 2
    reader = reopened.feature_reader(2)
    assert isinstance(reader, FeatureReader)
    assert (reader.round, reader.n, reader.dim, reader.chunk_rows) == (2, N, DIM, CHUNK)
    assert reader.checksum == checksum2
    np.testing.assert_array_equal(reader.read_all(), bank2)
    # Ranges that start and stop inside chunks, span chunks, touch the short last chunk, are empty.
    for start, stop in [(0, 1), (100, 700), (511, 513), (2900, 3000), (1024, 1024), (0, N)]:
        got = reader.read(start, stop)
        assert got.dtype == np.float32 and got.shape == (stop - start, DIM)
        np.testing.assert_array_equal(got, bank2[start:stop])
    np.testing.assert_array_equal(reopened.feature_reader(0).read_all(), bank0)


def test_complete_snapshot_is_immutable_and_write_is_idempotent(url):
    store = Store.create_or_open(url, N, DIM, "toy-v1", chunk_rows=CHUNK)
    bank = make_bank(1)
    checksum = store.write_features(1, bank)
    assert store.write_features(1, bank) == checksum
    # A complete snapshot is never overwritten: preparing/writing it again does nothing.
    store.prepare_features(1)
    assert store.write_feature_chunks(1, make_bank(9), 0, 1) == 0
    assert store.complete_features(1) == checksum
    np.testing.assert_array_equal(store.feature_reader(1).read_all(), bank)


def test_checksum_independent_of_chunk_owner_order(url):
    """Chunks written by several 'ranks' in any order give the single-writer checksum."""
    store = Store.create_or_open(url, N, DIM, "toy-v1", chunk_rows=CHUNK)
    bank = make_bank(3)
    single = store.write_features(0, bank)
    store.prepare_features(1)
    assert [store.write_feature_chunks(1, bank, rank, 4) for rank in (3, 1, 0, 2)] == [1, 2, 2, 1]
    assert store.complete_feature_rounds() == [0]          # not visible before complete
    with pytest.raises(StoreError, match="features round 1 is not complete"):
        store.feature_reader(1)
    assert store.complete_features(1) == single
    assert store.complete_feature_rounds() == [0, 1]


def test_missing_chunks_are_named(url):
    store = Store.create_or_open(url, N, DIM, "toy-v1", chunk_rows=CHUNK)
    store.prepare_features(4)
    store.write_feature_chunks(4, make_bank(4), 0, 3)       # chunks 0, 3
    store.write_feature_chunks(4, make_bank(4), 2, 3)       # chunks 2, 5
    with pytest.raises(StoreError) as err:
        store.complete_features(4)
    assert "missing chunks 1, 4 of 6" in str(err.value) and "\n" not in str(err.value)
    assert store.complete_feature_rounds() == []
    # The missing rank catches up; now it completes.
    store.write_feature_chunks(4, make_bank(4), 1, 3)
    store.complete_features(4)
    assert store.complete_feature_rounds() == [4]


def test_neighbourhoods_round_trip(url):
    store = Store.create_or_open(url, N, DIM, "toy-v1", CURRICULUM, chunk_rows=CHUNK)
    assert store.published_rounds() == [] and store.latest_published_round() is None
    neighbours, entropy, anchor, attrs = make_round(1)
    assert store.publish_neighbourhoods(1, neighbours, entropy, anchor, attrs) is True
    other = make_round(2, k=3)
    assert store.publish_neighbourhoods(3, *other) is True

    reopened = Store.open(url)
    assert reopened.published_rounds() == [1, 3] and reopened.latest_published_round() == 3
    got = reopened.read_neighbourhoods(1)
    assert got.round == 1
    np.testing.assert_array_equal(got.neighbours, neighbours)
    np.testing.assert_array_equal(got.entropy, entropy)
    np.testing.assert_array_equal(got.anchor, anchor)
    assert got.neighbours.dtype == np.int64 and got.entropy.dtype == np.float32
    assert got.anchor.dtype == np.bool_
    assert {k: got.attrs[k] for k in attrs} == attrs
    assert got.attrs["round"] == 1 and got.attrs["k"] == 2
    assert got.attrs["anchors"] == int(anchor.sum()) and len(got.attrs["checksum"]) == 64
    assert reopened.read_neighbourhoods(3).neighbours.shape == (N, 3)


def test_publish_twice_returns_false_and_changes_nothing(url):
    store = Store.create_or_open(url, N, DIM, "toy-v1", chunk_rows=CHUNK)
    first = make_round(1)
    assert store.publish_neighbourhoods(2, *first) is True
    before = store.read_neighbourhoods(2)
    assert store.publish_neighbourhoods(2, *first) is False
    assert store.publish_neighbourhoods(2, *make_round(7)) is False     # different data: still no
    after = store.read_neighbourhoods(2)
    np.testing.assert_array_equal(after.neighbours, before.neighbours)
    assert after.attrs == before.attrs


def test_labels_round_trip(url):
    store = Store.create_or_open(url, N, DIM, "toy-v1", chunk_rows=CHUNK)
    assert store.read_labels() is None
    labels = np.random.default_rng(0).integers(0, 10, N, dtype=np.int64)
    store.write_labels(labels)
    store.write_labels(labels)                              # same labels: no-op
    np.testing.assert_array_equal(Store.open(url).read_labels(), labels)
    with pytest.raises(StoreError, match="different labels"):
        store.write_labels((labels + 1) % 10)


@pytest.mark.parametrize("field, value, shown", [
    ("n", 1797, "n=1500, this run has n=1797"),
    ("dim", 64, "dim=16, this run has dim=64"),
    ("dataset_id", "cifar100", "dataset_id='cifar10', this run has dataset_id='cifar100'"),
])
def test_mismatched_store_refused_naming_both_values(url, field, value, shown):
    Store.create_or_open(url, 1500, 16, "cifar10", chunk_rows=CHUNK)
    args = {"n": 1500, "dim": 16, "dataset_id": "cifar10", field: value}
    with pytest.raises(StoreError) as err:
        Store.create_or_open(url, **args)
    message = str(err.value)
    assert f"store {url} was created for {shown}" in message
    assert "use another --store" in message and "\n" not in message
    assert isinstance(err.value, UserError)


def test_curriculum_recorded_and_fixed_once_rounds_are_published(url):
    store = Store.create_or_open(url, N, DIM, "toy-v1")
    assert store.info.curriculum is None and store.info.chunk_rows == 8192
    assert Store.create_or_open(url, N, DIM, "toy-v1", CURRICULUM).info.curriculum == CURRICULUM
    assert Store.open(url).info.curriculum == CURRICULUM
    assert Store.create_or_open(url, N, DIM, "toy-v1").info.curriculum == CURRICULUM
    # No neighbourhood round selected with it yet: a new curriculum replaces it.
    five = {**CURRICULUM, "rounds": 5}
    assert Store.create_or_open(url, N, DIM, "toy-v1", five).info.curriculum == five
    store.publish_neighbourhoods(1, *make_round(1))
    with pytest.raises(StoreError) as err:
        Store.create_or_open(url, N, DIM, "toy-v1", CURRICULUM)
    assert "created for curriculum" in str(err.value) and "'rounds': 5" in str(err.value)
    assert Store.open(url).info.curriculum == five


def test_open_missing_store_is_one_line_error(tmp_path, memory_store_url):
    for url in (str(tmp_path / "nowhere"), memory_store_url):
        with pytest.raises(StoreError) as err:
            Store.open(url)
        assert str(err.value).startswith(f"no store at {url}") and "\n" not in str(err.value)
    assert not (tmp_path / "nowhere").exists()              # opening created nothing


def test_describe_is_json_and_formats(url):
    store = Store.create_or_open(url, N, DIM, "toy-v1", CURRICULUM, chunk_rows=CHUNK)
    checksum = store.write_features(0, make_bank(0))
    store.prepare_features(1)                               # in progress: listed as incomplete
    store.publish_neighbourhoods(1, *make_round(1))
    described = store.describe()
    assert json.loads(json.dumps(described)) == described
    assert (described["n"], described["dim"], described["dataset_id"]) == (N, DIM, "toy-v1")
    assert described["curriculum"] == CURRICULUM and described["chunk_rows"] == CHUNK
    assert described["features"][0] == {"round": 0, "complete": True, "checksum": checksum}
    if url.startswith("memory://"):
        assert described["features"][1] == {"round": 1, "complete": False}
    else:
        assert described["leftovers"] == [f"features/.staging-round-0001-{store.writer}"]
    (nbr,) = described["neighbourhoods"]
    assert nbr["round"] == 1 and nbr["complete"] and nbr["k"] == 2 and nbr["consistency"] == 81.5
    assert "digests" not in nbr

    report = store.verify()
    assert report.ok and report.problems == []
    text = format_description(described, report)
    assert "toy-v1" in text and "n=3000" in text and "dim=16" in text
    assert f"checksum {checksum[:16]}" in text and "consistency 81.5%" in text
    assert "verify: ok" in text
    assert "verify" not in format_description(described)


def test_importing_storage_imports_neither_click_nor_the_packages_above_it():
    """storage imports only numpy and zarr (docs/ARCHITECTURE.md): the CLIs' click group lives in
    nbr_index.click_errors. In a fresh interpreter, as this process has imported everything."""
    import subprocess
    import sys
    from pathlib import Path

    check = ("import storage, sys; loaded = {m.split('.')[0] for m in sys.modules}; "
             "assert not loaded & {'click', 'torch', 'nbr_index', 'trainer'}, sorted(loaded & "
             "{'click', 'torch', 'nbr_index', 'trainer'})")
    done = subprocess.run([sys.executable, "-c", check], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

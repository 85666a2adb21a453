"""Bad input: a one-line StoreError, and the store left byte-for-byte unchanged.

Also the leftovers of killed writers (staging directories, incomplete in-place nodes) stay
invisible and do not stop the next publish.
"""

import os

import fsspec
import numpy as np
import pytest
import zarr

from storage import Store, StoreError

N, DIM, CHUNK = 1500, 8, 256
ATTRS = {"tau": 0.1, "fraction": 0.25, "mode": "progressive", "source_features_round": 0,
         "backend": "test", "seconds": 0.0}


def good_round():
    rng = np.random.default_rng(0)
    entropy = rng.random(N, dtype=np.float32)
    return rng.integers(0, N, (N, 2), dtype=np.int64), entropy, entropy < 0.5


def snapshot(url: str) -> dict:
    """Every file of the store and its bytes."""
    fs, root = fsspec.core.url_to_fs(url)
    return {path: fs.cat_file(path) for path in fs.find(root)}


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path, memory_store_url):
    url = str(tmp_path / "store") if request.param == "local" else memory_store_url
    store = Store.create_or_open(url, N, DIM, "toy-bad", chunk_rows=CHUNK)
    store.write_features(0, np.ones((N, DIM), np.float32))
    store.publish_neighbourhoods(1, *good_round(), dict(ATTRS))
    return store


def bank(shape=(N, DIM), dtype=np.float32):
    return np.zeros(shape, dtype)


def publish(round=2, **override):
    """A publish_neighbourhoods call with good arguments except ``override``."""
    neighbours, entropy, anchor = good_round()
    args = {"neighbours": neighbours, "entropy": entropy, "anchor": anchor, "attrs": dict(ATTRS),
            **override}
    return lambda s: s.publish_neighbourhoods(round, **args)


GOOD_NEIGHBOURS, GOOD_ENTROPY, GOOD_ANCHOR = good_round()

# case -> (call on the store, text the one-line message must contain)
BAD_CALLS = {
    "negative features round": (lambda s: s.feature_reader(-1),
                                "features round must be >= 0"),
    "missing features round": (lambda s: s.feature_reader(7),
                               "features round 7 is not complete"),
    "non-integer round": (lambda s: s.feature_reader("2"),
                          "features round must be an integer"),
    "bool round": (lambda s: s.write_features(True, bank()),
                   "features round must be an integer"),
    "neighbourhood round 0": (lambda s: s.read_neighbourhoods(0),
                              "neighbourhood round must be >= 1"),
    "missing neighbourhood round": (lambda s: s.read_neighbourhoods(5),
                                    "neighbourhood round 5 is not published"),
    "bank with wrong dim": (lambda s: s.write_features(2, bank((N, DIM + 1))),
                            f"bank must have shape ({N}, {DIM}), got ({N}, {DIM + 1})"),
    "bank with wrong n": (lambda s: s.write_features(2, bank((N - 1, DIM))),
                          "bank must have shape"),
    "bank float64": (lambda s: s.write_features(2, bank(dtype=np.float64)),
                     "bank must have dtype float32, got float64"),
    "bank 1-d": (lambda s: s.write_features(2, np.zeros(N * DIM, np.float32)),
                 "bank must have shape"),
    "bank as list": (lambda s: s.write_features(2, [[0.0] * DIM] * N),
                     "bank must be a numpy array"),
    "rank out of range": (lambda s: s.write_feature_chunks(0, bank(), 3, 3),
                          "need 0 <= rank < world_size"),
    "chunks before prepare": (lambda s: s.write_feature_chunks(3, bank(), 0, 1),
                              "features round 3 was not prepared"),
    "complete never written": (lambda s: s.complete_features(3),
                               "features round 3 was never prepared"),
    "read outside rows": (lambda s: s.feature_reader(0).read(10, N + 1),
                          f"row range [10, {N + 1}) is outside"),
    "neighbourhoods round 0": (publish(round=0), "neighbourhood round must be >= 1"),
    "neighbours int32": (publish(neighbours=GOOD_NEIGHBOURS.astype(np.int32)),
                         "neighbours must have dtype int64"),
    "neighbours short": (publish(neighbours=GOOD_NEIGHBOURS[:-1]), "neighbours must have shape"),
    "neighbours out of range": (publish(neighbours=GOOD_NEIGHBOURS + 1),
                                f"neighbours must hold row indices in [0, {N})"),
    "entropy float64": (publish(entropy=GOOD_ENTROPY.astype(np.float64)),
                        "entropy must have dtype float32"),
    "anchor as int": (publish(anchor=GOOD_ANCHOR.astype(np.int8)), "anchor must have dtype bool"),
    "attrs missing keys": (publish(attrs={"tau": 0.1}), "neighbourhood attrs lack fraction, mode"),
    "attrs reserved key": (publish(attrs={**ATTRS, "complete": True}), "may not set complete"),
    "attrs wrong k": (publish(attrs={**ATTRS, "k": 5}), "attrs say k=5 but the arrays give k=2"),
    "attrs not JSON": (publish(attrs={**ATTRS, "backend": object()}), "must be JSON-serialisable"),
    "attrs NaN": (publish(attrs={**ATTRS, "consistency": float("nan")}),
                  "must be JSON-serialisable"),
    "labels float": (lambda s: s.write_labels(np.zeros(N, np.float32)),
                     "labels must have dtype int64"),
    "labels short": (lambda s: s.write_labels(np.zeros(N - 1, np.int64)),
                     "labels must have shape (1500,)"),
    "mismatched n": (lambda s: Store.create_or_open(s.url, N + 1, DIM, "toy-bad"),
                     f"was created for n={N}, this run has n={N + 1}"),
    "mismatched dataset": (lambda s: Store.create_or_open(s.url, N, DIM, "other"),
                           "was created for dataset_id='toy-bad', this run has dataset_id='other'"),
    "bad curriculum": (lambda s: Store.create_or_open(s.url, N, DIM, "toy-bad", {"rounds": 4}),
                       "curriculum lacks k, tau, mode"),
    "zero n": (lambda s: Store.create_or_open(s.url, 0, DIM, "toy-bad"),
               "n must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_one_line_error_and_store_unchanged(store, case):
    call, expected = BAD_CALLS[case]
    before = snapshot(store.url)
    with pytest.raises(StoreError) as err:
        call(store)
    message = str(err.value)
    assert expected in message, message
    assert "\n" not in message and message.strip() == message
    assert snapshot(store.url) == before


def test_unwritable_paths(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as err:
        Store.create_or_open(str(blocker / "store"), N, DIM, "toy-bad")
    assert "cannot create the store in store" in str(err.value) and "\n" not in str(err.value)
    assert blocker.read_text() == "not a directory"

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="holds other files \\(thesis.tex\\) but no store"):
        Store.create_or_open(str(foreign), N, DIM, "toy-bad")
    assert os.listdir(foreign) == ["thesis.tex"]

    zarr.create_group(str(tmp_path / "plain"))              # a zarr hierarchy, not our store
    with pytest.raises(StoreError, match="not an AND store"):
        Store.open(str(tmp_path / "plain"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_store_directory(tmp_path):
    store = Store.create_or_open(str(tmp_path / "store"), N, DIM, "toy-bad", chunk_rows=CHUNK)
    (tmp_path / "store" / "features").chmod(0o555)
    try:
        with pytest.raises(StoreError, match="cannot prepare features round 0"):
            store.write_features(0, bank())
    finally:
        (tmp_path / "store" / "features").chmod(0o755)


def test_killed_writers_leftovers_are_invisible_and_harmless_local(tmp_path):
    url = str(tmp_path / "store")
    store = Store.create_or_open(url, N, DIM, "toy-bad", chunk_rows=CHUNK)
    data = np.random.default_rng(1).standard_normal((N, DIM)).astype(np.float32)
    # Killed just before the rename: a staging snapshot fully written and marked complete.
    store.prepare_features(2)
    store.write_feature_chunks(2, data * 2, 0, 1)
    zarr.open_group(url, path=f"features/.staging-round-0002-{store.writer}", mode="r+").attrs["complete"] = True
    # Killed half-way through a neighbourhood publish, and just before its rename.
    for name, complete in (("dead", False), ("late", True)):
        zarr.create_group(url, path=f"neighbourhoods/.tmp-round-0001-{name}",
                          attributes={"complete": complete})

    assert store.complete_feature_rounds() == [] and store.published_rounds() == []
    assert store.verify().ok
    assert sorted(store.describe()["leftovers"]) == [
        f"features/.staging-round-0002-{store.writer}", "neighbourhoods/.tmp-round-0001-dead",
        "neighbourhoods/.tmp-round-0001-late"]

    store.write_features(2, data)                       # the writer's stale staging is wiped, not reused
    np.testing.assert_array_equal(store.feature_reader(2).read_all(), data)
    assert store.publish_neighbourhoods(1, *good_round(), dict(ATTRS)) is True
    assert store.describe()["leftovers"] == []


def test_killed_writers_leftovers_are_invisible_and_harmless_memory(memory_store_url):
    store = Store.create_or_open(memory_store_url, N, DIM, "toy-bad", chunk_rows=CHUNK)
    data = np.random.default_rng(1).standard_normal((N, DIM)).astype(np.float32)
    store.prepare_features(2)                           # in place, complete=False
    store.write_feature_chunks(2, data * 2, 0, 2)
    zarr.create_group(store._location.zarr_store, path="neighbourhoods/round-0001",
                      attributes={"complete": False, "round": 1})
    assert store.complete_feature_rounds() == [] and store.published_rounds() == []
    with pytest.raises(StoreError, match="not published"):
        store.read_neighbourhoods(1)
    store.write_features(2, data)
    np.testing.assert_array_equal(store.feature_reader(2).read_all(), data)
    assert store.publish_neighbourhoods(1, *good_round(), dict(ATTRS)) is True
    assert store.read_neighbourhoods(1).attrs["anchors"] == int(good_round()[2].sum())

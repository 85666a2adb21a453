"""verify() and readers find corrupted chunks on disk and name them."""

import json

import numpy as np
import pytest

from storage import Store, StoreError

N, DIM, CHUNK = 5000, 32, 1024             # 5 chunks


@pytest.fixture
def store(tmp_path):
    store = Store.create_or_open(str(tmp_path / "store"), N, DIM, "toy-verify", chunk_rows=CHUNK)
    rng = np.random.default_rng(0)
    store.write_features(2, rng.standard_normal((N, DIM)).astype(np.float32))
    entropy = rng.random(N, dtype=np.float32)
    attrs = {"tau": 0.1, "fraction": 0.75, "mode": "progressive", "source_features_round": 2,
             "backend": "test", "seconds": 0.1}
    store.publish_neighbourhoods(3, rng.integers(0, N, (N, 4), dtype=np.int64), entropy,
                                 entropy < 0.5, attrs)
    store.write_labels(rng.integers(0, 10, N, dtype=np.int64))
    assert store.verify().ok
    return store


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["header", "middle", "last"])
def test_flipped_byte_in_feature_chunk_is_named(store, tmp_path, where):
    key = "features/round-0002/rows/c/3/0"
    chunk_file = tmp_path / "store" / key
    size = chunk_file.stat().st_size
    # The zstd frame header (decoding fails) or the compressed payload (decoding may fail or
    # give wrong values): both must be reported under the chunk's name.
    flip_byte(chunk_file, {"header": 0, "middle": size // 2, "last": size - 1}[where])

    report = store.verify()
    assert not report.ok
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{key}: ")
    assert "\n" not in report.problems[0]
    assert "features/round-0002" in report.checked

    reader = Store.open(str(tmp_path / "store")).feature_reader(2)
    np.testing.assert_array_equal(reader.read(0, 3 * CHUNK).shape, (3 * CHUNK, DIM))  # others fine
    with pytest.raises(StoreError) as err:
        reader.read_all()
    assert str(err.value).startswith(f"{key} is corrupted") and "\n" not in str(err.value)


def test_flipped_byte_in_neighbourhood_chunk_is_named(store, tmp_path):
    key = "neighbourhoods/round-0003/entropy/c/1"
    flip_byte(tmp_path / "store" / key, 20)
    report = store.verify()
    assert [p.split(":")[0] for p in report.problems] == [key]
    with pytest.raises(StoreError, match=f"^{key} is corrupted"):
        store.read_neighbourhoods(3)


def test_deleted_chunk_and_labels_chunk(store, tmp_path):
    (tmp_path / "store" / "features/round-0002/rows/c/4/0").unlink()    # the short last chunk
    flip_byte(tmp_path / "store" / "labels/c/0", 40)
    problems = store.verify().problems
    assert sorted(p.split(":")[0] for p in problems) == [
        "features/round-0002/rows/c/4/0", "labels/c/0"]


def test_tampered_digest_record_and_metadata(store, tmp_path):
    root = tmp_path / "store"
    flip_byte(root / "features/round-0002/digests/c/1/0", 5)             # uncompressed digest
    meta = root / "neighbourhoods/round-0003/zarr.json"
    attrs = json.loads(meta.read_text())
    attrs["attributes"]["checksum"] = "0" * 64
    meta.write_text(json.dumps(attrs))
    problems = store.verify().problems
    assert any(p.startswith("features/round-0002/digests/c/1/0: ") for p in problems)
    assert any(p.startswith("neighbourhoods/round-0003/zarr.json: the recorded checksum")
               for p in problems)

    meta.write_text("{not json")
    problems = store.verify().problems
    assert any(p.startswith("neighbourhoods/round-0003/zarr.json: cannot be read")
               for p in problems)
    assert store.published_rounds() == []           # unreadable = not visible to readers

"""Checksums over what is read, checkpoint digests, a full disk and the temporary files of killed
saves (issue 32, points 3, 6 and 7), on real stores, real checkpoints and real trainer processes.

* an array's decoding metadata (dtype, chunk shape, codecs, fill value) edited in its zarr.json is
  refused on every read path - a resume, `nbr-index query`, the labels - with one line naming the
  array and the field, and `verify` reports each;
* one flipped byte in checkpoint.pt (the memory bank, a weight, a config value), which torch.load
  does not notice, stops `trainer run --resume` with one line before anything trains;
* a full disk under the checkpoint or under the store is one line, leaves no temporary file,
  and the run resumes to the uninterrupted run's result once there is space (a small tmpfs; the
  cases are skipped, saying why, where one cannot be mounted).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from storage import SCHEMA_VERSION, Store, StoreError
from storage.checksums import chunk_digest, rows_checksum
from trainer.checkpoint import load_checkpoint, remove_stale_temp_files, save_checkpoint
from trainer.errors import TrainerError
from tests.helpers import checkpoint_position, kill_when_checkpointed

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: runs compare bit for bit and do not fight over the CI's cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# digits (N = 1500), rounds 0 and 1, two epochs each: neighbourhoods/round-0001 is trained on.
ARGS = ["--rounds", "1", "--epochs-per-round", "2", "--seed", "3"]


# ------------------------------------------------------------------------------ helpers
def trainer(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", "run", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def nbr_index(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbr_index", *args], env=ENV, capture_output=True, text=True,
                          timeout=120)


def one_line_exit_2(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The process exited 2 with exactly one `error:` line on stderr holding every fragment."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def copy_run(run: Path, into: Path) -> Path:
    """A copy of a run dir (with its store) to damage; resume it with --store <copy>/store."""
    copy = into / "run"
    shutil.copytree(run, copy, symlinks=True)
    return copy


def resume(run: Path, *extra: str) -> subprocess.CompletedProcess:
    return trainer("--run-dir", str(run), "--store", str(run / "store"), "--resume", *extra)


def edit_json(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document, indent=2))


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes, the locks and the writer lease aside (a starting
    run takes them before it reads anything)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (".run.lock", ".writer-lease.lock", "writer-lease.json")}


def final_bank(run: Path) -> torch.Tensor:
    return load_checkpoint(str(run / "checkpoint.pt"))["memory"]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` for the block; skips the test, saying why, where
    none can be mounted (mounting needs root with CAP_SYS_ADMIN, e.g. not in an unprivileged
    container)."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, and mounting one needs root")
    path.mkdir(parents=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: the full-disk cases need a small tmpfs")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the full-disk cases need one")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def grow_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


def temp_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if ".tmp-" in name)


# ------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    run = tmp_path_factory.mktemp("whole") / "run"
    done = trainer(*ARGS, "--run-dir", str(run))
    assert done.returncode == 0, done.stdout + done.stderr
    return run


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """The same run SIGKILLed in round 1, after neighbourhoods/round-0001 was published."""
    run = tmp_path_factory.mktemp("killed") / "run"
    kill_when_checkpointed([sys.executable, "-m", "trainer.cli", "run", *ARGS, "--run-dir", str(run)], run, ENV)
    assert Store.open(str(run / "store")).published_rounds() == [1]
    return run


# ------------------------------------------------------------ decoding metadata, real runs
def test_a_dtype_edit_in_the_neighbours_zarr_json_refuses_the_resume(killed_run, tmp_path):
    """float64 for int64 decodes every neighbour index as a tiny float, i.e. row 0 (kNN 60.27
    instead of 64.98 before this check): the resume stops before training, one line."""
    run = copy_run(killed_run, tmp_path)
    edit_json(run / "store/neighbourhoods/round-0001/neighbours/zarr.json",
              lambda meta: meta.update(data_type="float64"))
    checkpoint, store_files = (run / "checkpoint.pt").read_bytes(), files_of(run / "store")

    one_line_exit_2(resume(run), "neighbourhoods/round-0001/neighbours/zarr.json",
                    'data_type is "float64" but was "int64" when written')
    assert (run / "checkpoint.pt").read_bytes() == checkpoint          # nothing trained
    assert not (run / "summary.json").exists()
    assert files_of(run / "store") == store_files                      # nothing written to the store
    assert [p.split(":")[0] for p in Store.open(str(run / "store")).verify().problems] == [
        "neighbourhoods/round-0001/neighbours/zarr.json"]


def test_an_int32_edit_in_the_features_rows_zarr_json_refuses_query(whole_run, tmp_path):
    """int32 for float32 made `query` answer similarities of 6.8e19 with exit 0."""
    store = tmp_path / "store"
    shutil.copytree(whole_run / "store", store)
    answered = nbr_index("query", "--store", str(store), "--index", "0", "--k", "3", "--json")
    assert answered.returncode == 0, answered.stderr
    assert max(json.loads(answered.stdout)["queries"][0]["similarities"]) <= 1.0 + 1e-6   # cosines

    edit_json(store / "features/round-0001/rows/zarr.json", lambda meta: meta.update(data_type="int32"))
    one_line_exit_2(nbr_index("query", "--store", str(store), "--index", "0", "--k", "3"),
                    "features/round-0001/rows/zarr.json", 'data_type is "int32" but was "float32" when written')
    # The other snapshot is intact and still answers.
    assert nbr_index("query", "--store", str(store), "--round", "0", "--index", "0").returncode == 0


def test_a_damaged_features_zarr_json_says_so_instead_of_not_complete(whole_run, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(whole_run / "store", store)
    (store / "features/round-0000/zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')
    line = one_line_exit_2(nbr_index("query", "--store", str(store), "--round", "0", "--index", "0"),
                           "features round 0 cannot be opened: ",
                           f"features/round-0000/zarr.json in store {store} exists but cannot be read or decoded")
    assert "not complete" not in line and "finish" not in line


# ------------------------------------------------------------ decoding metadata, every reader
N, DIM, CHUNK = 50, 8, 16
NBR_ATTRS = {"tau": 0.1, "fraction": 0.5, "mode": "progressive", "source_features_round": 0,
             "backend": "test", "seconds": 0.0}


@pytest.fixture
def store(tmp_path) -> Store:
    rng = np.random.default_rng(0)
    store = Store.create_or_open(str(tmp_path / "store"), N, DIM, "toy-checksums", chunk_rows=CHUNK)
    store.write_features(0, rng.standard_normal((N, DIM)).astype(np.float32))
    entropy = rng.random(N, dtype=np.float32)
    store.publish_neighbourhoods(1, rng.integers(0, N, (N, 2), dtype=np.int64), entropy, entropy < 0.5, NBR_ATTRS)
    store.write_labels(rng.integers(0, 10, N, dtype=np.int64))
    assert store.verify().ok
    return store


def _chunk_shape(rows: int):
    def change(meta):
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] = rows
    return change


EDITS = {   # array, its reader, the edit, the field named
    "chunk shape of the feature rows": ("features/round-0000/rows", lambda s: s.feature_reader(0),
                                        _chunk_shape(CHUNK * 2), "chunk_grid"),
    "byte order of the entropies": ("neighbourhoods/round-0001/entropy", lambda s: s.read_neighbourhoods(1),
                                    lambda m: m["codecs"][0]["configuration"].update(endian="big"), "codecs"),
    "compressor of the anchors": ("neighbourhoods/round-0001/anchor", lambda s: s.read_neighbourhoods(1),
                                  lambda m: m.update(codecs=m["codecs"][:1]), "codecs"),
    "dtype of the labels": ("labels", lambda s: s.read_labels(), lambda m: m.update(data_type="float64"),
                            "data_type"),
    "fill value of the labels": ("labels", lambda s: s.read_labels(), lambda m: m.update(fill_value=7),
                                 "fill_value"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_decoding_is_refused_by_its_reader_and_reported_by_verify(store, tmp_path, edit):
    array, read, change, field = EDITS[edit]
    edit_json(tmp_path / "store" / array / "zarr.json", change)
    reopened = Store.open(str(tmp_path / "store"))
    with pytest.raises(StoreError) as err:
        read(reopened)
    message = str(err.value)
    assert message.startswith(f"{array}/zarr.json in store ") and f"{field} is " in message and "\n" not in message
    assert [p.split(": ")[0] for p in reopened.verify().problems] == [f"{array}/zarr.json"]
    assert f"{field} is " in reopened.verify().problems[0]

    inspected = nbr_index("inspect", "--store", str(tmp_path / "store"), "--verify")
    assert inspected.returncode == 1 and f"{array}/zarr.json: {field} is " in inspected.stdout


def test_chunk_digests_name_the_dtype_so_a_consistent_dtype_edit_is_caught_too(store, tmp_path):
    """Even with the node's record edited to agree with the array's zarr.json, the same bytes read
    as float64 do not match the int64 chunk digests (they name the dtype and shape)."""
    neighbours = np.arange(6, dtype=np.int64).reshape(3, 2)
    assert chunk_digest(neighbours) != chunk_digest(neighbours.view(np.float64))
    assert chunk_digest(neighbours) != chunk_digest(neighbours.reshape(2, 3))
    assert chunk_digest(neighbours) == chunk_digest(neighbours.astype(">i8"))     # byte order is not content
    node = tmp_path / "store/neighbourhoods/round-0001"
    edit_json(node / "neighbours/zarr.json", lambda meta: meta.update(data_type="float64", fill_value=0.0))
    edit_json(node / "zarr.json", lambda meta: meta["attributes"]["decoding"]["neighbours"].update(
        data_type="float64", fill_value=0.0))
    with pytest.raises(StoreError, match=r"^neighbourhoods/round-0001/neighbours/c/\d+/0 is corrupted: its contents"):
        Store.open(str(tmp_path / "store")).read_neighbourhoods(1)


def test_the_checksum_still_does_not_depend_on_the_writers(tmp_path):
    """8 ranks and one process write the same snapshot checksum, which a bank in memory gives too."""
    bank = np.random.default_rng(1).standard_normal((N, DIM)).astype(np.float32)
    one = Store.create_or_open(str(tmp_path / "one"), N, DIM, "toy", chunk_rows=CHUNK)
    many = Store.create_or_open(str(tmp_path / "many"), N, DIM, "toy", chunk_rows=CHUNK)
    many.prepare_features(0)
    for rank in range(8):
        many.write_feature_chunks(0, bank, rank, 8)
    assert many.complete_features(0) == one.write_features(0, bank) == rows_checksum(bank, CHUNK)
    np.testing.assert_array_equal(many.feature_reader(0).read_all(), bank)


def test_a_store_of_the_previous_schema_is_refused_with_one_line(store, tmp_path):
    edit_json(tmp_path / "store/zarr.json", lambda meta: meta["attributes"].update(schema_version=SCHEMA_VERSION - 1))
    with pytest.raises(StoreError, match=f"written by an older and-nbr \\(schema version {SCHEMA_VERSION - 1}"):
        Store.open(str(tmp_path / "store"))
    one_line_exit_2(nbr_index("inspect", "--store", str(tmp_path / "store")), "written by an older and-nbr",
                    "train again into a new --store")


def test_a_damaged_digest_record_is_one_line_for_readers(store, tmp_path):
    edit_json(tmp_path / "store/neighbourhoods/round-0001/zarr.json",
              lambda meta: meta["attributes"]["digests"]["entropy"].__setitem__(0, "not hex"))
    with pytest.raises(StoreError, match="^neighbourhoods/round-0001/zarr.json: its chunk digests or checksum "
                                         "are missing or malformed"):
        Store.open(str(tmp_path / "store")).read_neighbourhoods(1)


# ------------------------------------------------------------------------- checkpoints
def _flip_stored_byte(checkpoint: Path, stored: bytes) -> str:
    """Flip one bit in the middle of the zip entry of checkpoint.pt that stores ``stored`` (a
    tensor's bytes, or the pickle); returns the entry's name. Only the entry's CRC notices."""
    with zipfile.ZipFile(checkpoint) as archive:
        entry = next(info for info in archive.infolist()
                     if info.compress_type == zipfile.ZIP_STORED and archive.read(info).find(stored) >= 0)
        at = archive.read(entry).find(stored) + len(stored) // 2
    with open(checkpoint, "r+b") as fh:
        fh.seek(entry.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", fh.read(4))
        offset = entry.header_offset + 30 + name_length + extra_length + at
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x01]))
    return entry.filename


def _a_weight(state: dict) -> str:
    """The first convolution's weight (4-D: a weight, not a batch-norm vector)."""
    return next(name for name, value in state["model"].items() if name.endswith("weight") and value.dim() == 4)


FLIPS = {   # what to flip: the bytes stored for it, the name the error gives it
    "memory bank": (lambda s: s["memory"].numpy().tobytes(), lambda s: "tensor memory "),
    "weight": (lambda s: s["model"][_a_weight(s)].numpy().tobytes(), lambda s: f"tensor model['{_a_weight(s)}'] "),
    "config lr": (lambda s: b"G" + struct.pack(">d", s["config"]["lr"]), lambda s: "a value that is not a tensor"),
}


@pytest.mark.parametrize("flip", sorted(FLIPS))
def test_a_flipped_byte_in_checkpoint_pt_stops_the_resume_with_one_line(whole_run, tmp_path, flip):
    run = copy_run(whole_run, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    stored, named = FLIPS[flip]
    entry = _flip_stored_byte(run / "checkpoint.pt", stored(state))
    # What the check is for: torch.load reads the changed file without a word; the CRC knows.
    with zipfile.ZipFile(run / "checkpoint.pt") as archive:
        assert archive.testzip() == entry
    torch.load(run / "checkpoint.pt", weights_only=True)
    before = files_of(run)

    one_line_exit_2(resume(run), f"checkpoint {run / 'checkpoint.pt'} is damaged: {named(state)}",
                    "does not match the digest recorded when it was saved")
    assert files_of(run) == before                                     # nothing trained or written
    with pytest.raises(TrainerError, match="is damaged"):                # export and load_model read it so too
        load_checkpoint(str(run / "checkpoint.pt"))


def test_a_checkpoint_without_digests_is_refused_as_older(whole_run, tmp_path):
    state = torch.load(whole_run / "checkpoint.pt", weights_only=True)
    del state["digests"]
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(TrainerError, match="carries no digests: it was written by an older trainer") as err:
        load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert "\n" not in str(err.value)


def test_a_checkpoint_round_trips_with_its_digests(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "memory": torch.randn(10, 3),
             "rng": {"torch": torch.get_rng_state()}, "config": {"lr": 0.1, "milestones": (0.5,)}, "rounds": []}
    save_checkpoint(str(tmp_path / "checkpoint.pt"), state)
    digests = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["digests"]
    assert {"memory", "model['0.weight']", "optimizer['state'][0]['momentum_buffer']", "rng['torch']",
            "<values>"} <= set(digests)


# ---------------------------------------------------------------------------- full disk
def test_save_checkpoint_on_a_full_disk_or_read_only_dir_is_one_line_and_leaves_no_temp_file(tmp_path):
    with small_tmpfs(tmp_path / "small", "256k") as small:
        save_checkpoint(str(small / "checkpoint.pt"), {"memory": torch.zeros(10, 4)})
        kept = (small / "checkpoint.pt").read_bytes()
        with pytest.raises(TrainerError, match=f"^cannot save checkpoint {small / 'checkpoint.pt'} ") as err:
            save_checkpoint(str(small / "checkpoint.pt"), {"memory": torch.zeros(512, 256)})   # 512 KiB
        assert "\n" not in str(err.value) and "free space on its disk" in str(err.value)
        assert os.listdir(small) == ["checkpoint.pt"] and (small / "checkpoint.pt").read_bytes() == kept

        subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True, capture_output=True)
        with pytest.raises(TrainerError, match="^cannot save checkpoint .*Read-only file system"):
            save_checkpoint(str(small / "checkpoint.pt"), {"memory": torch.zeros(10, 4)})
        assert os.listdir(small) == ["checkpoint.pt"] and (small / "checkpoint.pt").read_bytes() == kept


def test_a_full_disk_under_the_checkpoint_is_one_line_and_the_run_resumes_identically(whole_run, tmp_path):
    """checkpoint.pt is 1.7 MB: a 3 MiB run dir holds one, not the second one's temporary file."""
    with small_tmpfs(tmp_path / "small", "3m") as small:
        run, store = small / "run", tmp_path / "store"
        one_line_exit_2(trainer(*ARGS, "--run-dir", str(run), "--store", str(store)),
                        f"cannot save checkpoint {run / 'checkpoint.pt'} ", "free space on its disk")
        assert temp_files(run) == []
        assert checkpoint_position(run / "checkpoint.pt") == (0, 1)     # the last good one, intact
        load_checkpoint(str(run / "checkpoint.pt"))

        grow_tmpfs(small, "64m")
        done = trainer("--run-dir", str(run), "--store", str(store), "--resume")
        assert done.returncode == 0, done.stdout + done.stderr
        assert torch.equal(final_bank(run), final_bank(whole_run))
        assert temp_files(run) == []


def test_a_full_disk_under_the_store_is_one_line_and_the_run_resumes_identically(whole_run, tmp_path):
    """A feature snapshot is 0.75 MB: a 1.25 MiB store holds round 0's, not round 1's."""
    with small_tmpfs(tmp_path / "small", "1280k") as small:
        run, store = tmp_path / "run", small / "store"
        line = one_line_exit_2(trainer(*ARGS, "--run-dir", str(run), "--store", str(store)), f"store {store}")
        assert "No space left on device" in line
        written = Store.open(str(store))
        assert written.complete_feature_rounds() == [0] and written.verify().ok     # nothing lost

        grow_tmpfs(small, "64m")
        done = trainer("--run-dir", str(run), "--store", str(store), "--resume")
        assert done.returncode == 0, done.stdout + done.stderr
        assert torch.equal(final_bank(run), final_bank(whole_run))
        resumed = Store.open(str(store))
        assert resumed.complete_feature_rounds() == [0, 1] and resumed.verify().ok
        assert resumed.describe()["leftovers"] == []                   # the failed write's staging is gone


# ------------------------------------------------------------------------ stale temp files
def test_temp_files_of_killed_saves_are_removed_by_name_only(whole_run, tmp_path):
    run = copy_run(whole_run, tmp_path)
    stale = ["checkpoint.pt.tmp-4194305", "checkpoint.pt.tmp-1"]
    kept = ["checkpoint.pt.tmp-", "checkpoint.pt.tmp-12x", "checkpoint.pt.tmp-1.keep", "model.pt.tmp-7",
            "export.pt.tmp-99"]
    for name in stale + kept:
        (run / name).write_bytes(b"half a checkpoint")
    # A finished run resumed saves nothing: what removes them is the start.
    done = resume(run)
    assert done.returncode == 0, done.stdout + done.stderr
    assert temp_files(run) == sorted(kept)

    assert remove_stale_temp_files(str(tmp_path / "absent")) == []
    (run / stale[0]).write_bytes(b"half a checkpoint")
    save_checkpoint(str(run / "checkpoint.pt"), dict(load_checkpoint(str(run / "checkpoint.pt"))))
    assert temp_files(run) == sorted(kept)                            # and every save, before it writes

"""Every bad value is refused up front, in one line, with nothing written (issue 32, points 4 and 5).

Each case runs through a real command line: exit status 2, exactly one ``error:`` line naming
the flag or file, and the run dir not created / the store unchanged. Most go through click's
CliRunner in this process (the checks run before any training, so each takes well under a
second); a few run as real subprocesses to check the installed entry points end to end.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nbr_index.cli import main as nbr_main
from storage import Store, StoreError
from tests.helpers import one_line_error, unit_rows
from trainer.cli import main as trainer_main
from trainer.config import ConfigError, TrainConfig, check_bank_fits, min_knn_sigma, resolve, validate

REPO = Path(__file__).resolve().parents[1]
N, DIM = 200, 8


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: what "unchanged" compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def trainer_run(tmp_path, *args):
    run = tmp_path / "run"
    result = CliRunner().invoke(trainer_main, ["run", "--run-dir", str(run), *map(str, args)])
    return result, run


# ------------------------------------------------------------------ trainer run: every numeric flag

@pytest.mark.parametrize("args, message", [
    # lr: positive, finite, representable in the float32 parameters (1e308 raised inside SGD's step)
    (["--lr", "1e308"], "--lr must be at most 3.40282e+38 (the parameters are float32), got 1e+308"),
    (["--lr", "0"], "--lr must be above 0"),
    (["--lr", "-0.1"], "--lr must be above 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr-gamma", "-5"], "--lr-gamma must be above 0"),             # a negative lr: gradient ascent
    (["--lr-gamma", "0"], "--lr-gamma must be above 0"),
    (["--lr-gamma", "1e30"], "--lr 0.03 times --lr-gamma 1e+30 at each of 2 milestones exceeds 3.40282e+38"),
    (["--lr-gamma", "nan"], "--lr-gamma must be a finite number"),
    (["--lr-milestones", "0.5,nan"], "--lr-milestones must be fractions of a round in (0, 1]"),
    (["--lr-milestones", "1.5"], "--lr-milestones must be fractions of a round in (0, 1]"),
    (["--momentum", "-1"], "--momentum must be at least 0"),
    (["--momentum", "1"], "--momentum must be below 1"),
    (["--momentum", "nan"], "--momentum must be a finite number"),
    (["--momentum", "inf"], "--momentum must be a finite number"),
    (["--momentum", "0"], "--nesterov needs a --momentum above 0"),   # torch raised ValueError
    (["--weight-decay", "-1"], "--weight-decay must be at least 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--weight-decay", "1e39"], "--weight-decay must be at most 3.40282e+38"),
    (["--seed", "-1"], "--seed must be at least 0 (torch.manual_seed's range), got -1"),
    (["--seed", str(2**64 + 1)], f"--seed must be at most {2**63 - 1}"),
    (["--seed", str(2**63)], f"--seed must be at most {2**63 - 1}"),
    (["--dim", "0"], "--dim must be at least 1"),
    (["--dim", "100000000"], "--dim must be at most 65536"),
    (["--knn-sigma", "1e-30"], "--knn-sigma must be at least 0.0121323"),  # the vote overflowed to chance
    (["--knn-sigma", "0"], "--knn-sigma must be at least"),
    (["--knn-sigma", "nan"], "--knn-sigma must be a finite number"),
    (["--knn-sigma", "inf"], "--knn-sigma must be a finite number"),
    (["--knn-k", "0"], "--knn-k must be at least 1"),
    (["--tau", "0"], "--tau must be at least"),
    (["--tau", "nan"], "--tau must be a finite number"),
    (["--tau", "inf"], "--tau must be a finite number"),
    (["--tau", "1e-39"], "--tau must be at least"),
    (["--eta", "0"], "--eta must be above 0"),
    (["--eta", "1.5"], "--eta must be at most 1"),
    (["--eta", "nan"], "--eta must be a finite number"),
    (["--index-timeout", "0"], "--index-timeout must be above 0"),
    (["--index-timeout", "nan"], "--index-timeout must be a finite number"),
    (["--index-timeout", "inf"], "--index-timeout must be a finite number"),
    (["--epochs-per-round", "0"], "--epochs-per-round must be at least 1, got 0"),   # was silently 30
    (["--epochs-per-round", "-3"], "--epochs-per-round must be at least 1, got -3"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--rounds", "2000"], "--rounds 2000 is larger than the training set (N = 1500)"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--k", "0"], "--k must be at least 1"),
    (["--eval-every", "-1"], "--eval-every must be at least 0"),
    (["--image-size", "4"], "--image-size must be at least 8"),
    (["--image-size", "100000"], "--image-size must be at most 4096"),
    (["--workers", "-1"], "--workers must be at least 0"),
    (["--workers", "100000"], "--workers must be at most 256"),
    (["--max-anchor-fraction", "0"], "--max-anchor-fraction must be above 0"),
    (["--max-anchor-fraction", "nan"], "--max-anchor-fraction must be a finite number"),
    # the launch flags of `trainer run` (socket.bind raised OverflowError for these ports)
    (["--master-port", "-5"], "--master-port must be a TCP port in [1, 65535], or 0 to pick a free one, got -5"),
    (["--master-port", "99999"], "--master-port must be a TCP port in [1, 65535], or 0 to pick a free one"),
    (["--world-size", "0"], "--world-size must be at least 1, got 0"),
    (["--max-restarts", "-1"], "--max-restarts must be 0 or more, got -1"),
])
def test_a_bad_number_is_one_line_and_writes_nothing(tmp_path, args, message):
    result, run = trainer_run(tmp_path, "--rounds", "2", *args)
    one_line_error(result, message)
    assert not run.exists()


def test_bad_numbers_in_a_config_file_are_refused_the_same_way(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs_per_round: 0\n")
    result, run = trainer_run(tmp_path, "--config", tmp_path / "c.yaml")
    one_line_error(result, "--epochs-per-round must be at least 1, got 0")
    (tmp_path / "c.toml").write_text("lr_gamma = -5.0\n")
    result, run = trainer_run(tmp_path, "--config", tmp_path / "c.toml")
    one_line_error(result, "--lr-gamma must be above 0")
    assert not run.exists()


def test_zero_epochs_stay_zero_and_only_none_takes_the_default():
    assert resolve(TrainConfig(epochs_per_round=None)).epochs_per_round == 30     # digits' default
    assert resolve(TrainConfig(epochs_per_round=0)).epochs_per_round == 0
    with pytest.raises(ConfigError, match="--epochs-per-round must be at least 1, got 0"):
        validate(resolve(TrainConfig(epochs_per_round=0)))


def test_the_bounds_let_the_papers_and_the_edge_values_through():
    for cfg in (TrainConfig(), TrainConfig(momentum=0.0, nesterov=False), TrainConfig(lr_gamma=1.0, eta=1.0), TrainConfig(lr_gamma=10.0),
                TrainConfig(seed=2**63 - 1, weight_decay=0.0, knn_sigma=0.07, tau=0.07),
                TrainConfig(knn_sigma=min_knn_sigma(200), knn_k=200), TrainConfig(dim=65536, eval_every=0)):
        validate(resolve(cfg))


def test_the_knn_sigma_bound_is_where_the_float32_vote_stops_overflowing():
    import torch

    from trainer.knn import knn_class_scores

    # Similarities of 1 (the worst case), summed over k = 200 neighbours of one class.
    bank = torch.nn.functional.normalize(torch.ones(200, 4), dim=1)
    labels = torch.zeros(200, dtype=torch.int64)
    sigma = min_knn_sigma(200)
    assert torch.isfinite(knn_class_scores(bank[:1], bank, labels, 2, 200, sigma)).all()
    assert not torch.isfinite(knn_class_scores(bank[:1], bank, labels, 2, 200, sigma * 0.97)).all()


def test_a_memory_bank_larger_than_memory_is_one_line():
    with pytest.raises(ConfigError, match=r"^the memory bank of N = 1000000000 rows x --dim 65536 x 4 bytes needs "
                                          r"244140\.6 GiB, more than the .* GiB of memory available: lower --dim"):
        check_bank_fits(10**9, 65536)
    check_bank_fits(1500, 128)


@pytest.mark.parametrize("args, message", [
    (["--n", str(10**12)], "the memory bank of N = 1000000000000 rows"),
    (["--size", "100000"], "--size must be at most 4096"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
])
def test_speed_refuses_sizes_that_cannot_run(args, message):
    one_line_error(CliRunner().invoke(trainer_main, ["speed", *args]), message)


@pytest.mark.parametrize("value, message", [("nan", "--lr must be a finite number"), ("-1", "--lr must be above 0"),
                                            ("1e308", "--lr must be at most 3.40282e+38")])
def test_linear_probe_refuses_a_bad_lr_before_reading_the_run(tmp_path, value, message):
    one_line_error(CliRunner().invoke(trainer_main, ["linear-probe", "--run-dir", str(tmp_path), "--lr", value]),
                   message)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ image folders

def png_header(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height 8-bit grey pixels and holds none: what PIL reads at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "train" / name / f"{i}.png")
    return root


def image_folder_run(tmp_path, root, *args):
    return trainer_run(tmp_path, "--dataset", "imagefolder", "--data-root", root, "--batch-size", "4",
                       "--knn-k", "2", "--rounds", "1", *args)


@pytest.mark.parametrize("which", ["first", "later"])
def test_an_undecodable_image_is_named(tmp_path, image_folder, which):
    bad = image_folder / "train" / ("a/0.png" if which == "first" else "b/3.png")
    bad.write_bytes(b"not an image")
    result, run = image_folder_run(tmp_path, image_folder)
    one_line_error(result, f"cannot decode image {bad}: cannot identify image file")
    assert not run.exists()


def test_a_class_folder_that_links_to_itself_is_named(tmp_path, image_folder):
    loop = image_folder / "train" / "c"
    loop.symlink_to("c")
    result, run = image_folder_run(tmp_path, image_folder)
    one_line_error(result, f"cannot read {loop}: Too many levels of symbolic links (a symbolic link loop")
    assert not run.exists()


@pytest.mark.parametrize("side, pil_says", [(10_000, "PIL warns"), (20_000, "PIL refuses")])
def test_a_decompression_bomb_is_named_with_pils_limit(tmp_path, image_folder, side, pil_says):
    from PIL import Image

    bomb = image_folder / "train" / "a" / "0.png"
    png_header(bomb, side, side)
    result, run = image_folder_run(tmp_path, image_folder)
    one_line_error(result, f"image {bomb} is too large to decode safely (Image size ({side * side} pixels)")
    assert f"PIL.Image.MAX_IMAGE_PIXELS, is {Image.MAX_IMAGE_PIXELS} pixels" in result.stderr
    assert not run.exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_an_undecodable_image_of_a_streamed_folder_is_one_line_from_a_worker_too(tmp_path, workers):
    """Folders of large images are decoded while training, in DataLoader workers: a worker's
    error comes back as the same one line, not the worker's traceback."""
    from PIL import Image

    from trainer.data import DataError, load_dataset

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(tmp_path / "train" / name / f"{i}.png")
    bad = tmp_path / "train" / "b" / "1.png"
    bad.write_bytes(b"not an image")
    data = load_dataset("imagefolder", str(tmp_path), image_size=72, workers=workers)
    assert not data.in_memory
    with pytest.raises(DataError) as err:
        list(data.eval_batches("train", 2))
    assert str(err.value) == f"cannot decode image {bad}: cannot identify image file '{bad}'"


# ------------------------------------------------------------------ nbr-index: serve and query

@pytest.fixture
def store(tmp_path):
    store = Store.create_or_open(str(tmp_path / "store"), N, DIM, "toy-values",
                                 curriculum={"rounds": 2, "k": 1, "tau": 0.1, "mode": "progressive"}, chunk_rows=64)
    store.write_features(0, unit_rows(N, DIM))
    return store


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_serve_refuses_a_poll_interval_that_is_not_a_positive_finite_time(tmp_path, store, value):
    before = files_of(tmp_path / "store")
    ready = tmp_path / "ready"
    result = CliRunner().invoke(nbr_main, ["serve", "--store", store.url, "--poll-seconds", value,
                                           "--ready-file", str(ready)])
    one_line_error(result, f"--poll-seconds must be a finite number of seconds above 0, got {float(value)}")
    assert files_of(tmp_path / "store") == before and not ready.exists()


@pytest.mark.parametrize("command, args, message", [
    ("serve", ["--progress-seconds", "nan"], "--progress-seconds must be a finite number of seconds above 0, got nan"),
    ("serve", ["--progress-seconds", "-1"], "--progress-seconds must be a finite number of seconds above 0, got -1.0"),
    ("serve", ["--master-port", "99999"], "--master-port must be a TCP port, 1 to 65535 (0: pick a free one), got 99999"),
    ("serve", ["--max-in-memory-gb", "nan"], "--max-in-memory-gb must be 0 or more (inf: always whole), got nan"),
    ("rebuild", ["--round", "1", "--max-in-memory-gb", "-1"],
     "--max-in-memory-gb must be 0 or more (inf: always whole), got -1.0"),
    ("rebuild", ["--round", "1", "--backend", "faiss-ivf", "--nlist", "0"],
     "--nprobe and --nlist must be at least 1, got 32 and 0"),
    ("rebuild", ["--round", "1", "--world-size", "2", "--master-port", "-5"],
     "--master-port must be a TCP port, 1 to 65535 (0: pick a free one), got -5"),
])
def test_the_index_refuses_bad_numbers_before_it_starts(tmp_path, store, command, args, message):
    before = files_of(tmp_path / "store")
    result = CliRunner().invoke(nbr_main, [command, "--store", store.url, "--once", *args] if command == "serve"
                                else [command, "--store", store.url, *args])
    one_line_error(result, message)
    assert files_of(tmp_path / "store") == before


def npy_claiming(path: Path, shape: tuple, payload: bytes = b"\0" * 64) -> None:
    from numpy.lib import format as npy

    with open(path, "wb") as fh:
        npy.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
        fh.write(payload)


def test_query_refuses_a_vectors_header_that_claims_more_than_the_file_holds(tmp_path, store):
    huge = tmp_path / "huge.npy"
    npy_claiming(huge, (100_000_000_000, 128))          # 46.6 TiB of float32 in 192 bytes
    before = files_of(tmp_path / "store")
    result = CliRunner().invoke(nbr_main, ["query", "--store", store.url, "--vectors", str(huge)])
    one_line_error(result, f"--vectors {huge}: its .npy header describes a float32 array of shape "
                           f"(100000000000, 128) (4.77e+04 GiB), but the file holds 64 bytes after the header")
    assert files_of(tmp_path / "store") == before


def test_query_still_reads_a_whole_vectors_file(tmp_path, store):
    vectors = tmp_path / "v.npy"
    np.save(vectors, unit_rows(3, DIM, seed=1))
    result = CliRunner().invoke(nbr_main, ["query", "--store", store.url, "--vectors", str(vectors), "--k", "2",
                                           "--json"])
    assert result.exit_code == 0, result.output
    assert [len(q["neighbours"]) for q in json.loads(result.output)["queries"]] == [2, 2, 2]


# ------------------------------------------------------------------ damaged and unreadable stores

def edit_root_attrs(root: Path, **changes) -> None:
    meta = json.loads((root / "zarr.json").read_text())
    for name, value in changes.items():
        if value is None:
            meta["attributes"].pop(name)
        else:
            meta["attributes"][name] = value
    (root / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("changes, message", [
    ({"schema_version": "2"}, "has schema_version = '2', expected a positive integer"),   # was a TypeError
    ({"chunk_rows": 0}, "has chunk_rows = 0, expected a positive integer"),              # verify said ok
    ({"n": -1}, "has n = -1, expected a positive integer"),
    ({"dim": True}, "has dim = True, expected a positive integer"),
    ({"chunk_rows": None}, "lacks the chunk_rows attribute"),
    ({"dataset_id": ""}, "has dataset_id = '', expected a non-empty string"),
    ({"curriculum": [1]}, "has curriculum = [1], expected a mapping or null"),
])
def test_damaged_root_attrs_are_one_line_for_every_reader(tmp_path, store, changes, message):
    root = tmp_path / "store"
    edit_root_attrs(root, **changes)
    before = files_of(root)
    for command in (["inspect", "--store", str(root), "--verify"], ["query", "--store", str(root), "--index", "0"]):
        one_line_error(CliRunner().invoke(nbr_main, command), f"{root}/zarr.json {message}: the store is damaged")
    with pytest.raises(StoreError, match="the store is damaged"):
        Store.open(str(root))
    assert files_of(root) == before


@pytest.mark.parametrize("where", ["", "features", "neighbourhoods"])
def test_verify_refuses_a_store_it_cannot_read(tmp_path, store, where):
    """A directory that cannot be listed: a symbolic link loop (unreadable to root as well)."""
    root = tmp_path / "store"
    if where:
        target = root / where
        os.rename(target, tmp_path / "moved")
        target.symlink_to(where)
        shown = f"{root}/{where}"
    else:
        root = tmp_path / "loop"
        root.symlink_to("loop")
        shown = str(root)
    result = CliRunner().invoke(nbr_main, ["inspect", "--store", str(root), "--verify"])
    one_line_error(result, f"store {shown} cannot be read (Too many levels of symbolic links): a symbolic link "
                           f"there leads back to itself")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory whatever its permission bits")
def test_verify_refuses_a_store_without_read_permission(tmp_path, store):
    features = tmp_path / "store" / "features"
    features.chmod(0o000)
    try:
        result = CliRunner().invoke(nbr_main, ["inspect", "--store", str(tmp_path / "store"), "--verify"])
        one_line_error(result, f"store {features} cannot be read (Permission denied): give this user read access")
    finally:
        features.chmod(0o755)


# ------------------------------------------------------------------ the installed entry points, end to end

def run_cli(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def one_line_exit_2(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_subprocess_trainer_lr_overflow(tmp_path):
    one_line_exit_2(run_cli("trainer.cli", "run", "--run-dir", "run", "--lr", "1e308", cwd=tmp_path),
                    "--lr must be at most 3.40282e+38")
    assert not (tmp_path / "run").exists()


def test_subprocess_query_huge_header(tmp_path, store):
    before = files_of(tmp_path / "store")
    npy_claiming(tmp_path / "huge.npy", (100_000_000_000, 128))
    one_line_exit_2(run_cli("nbr_index", "query", "--store", store.url, "--vectors", "huge.npy", cwd=tmp_path),
                    "its .npy header describes a float32 array of shape (100000000000, 128)")
    assert files_of(tmp_path / "store") == before

"""After training: export, load_model / embed, `trainer embed`, `nbr-index query`, `trainer report` and
TensorBoard events, on real short digits runs."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import trainer
from nbr_index.cli import main as nbr_index_main
from nbr_index.reference import brute_force_knn_entropy
from storage import Store
from trainer.checkpoint import checkpoint_path, load_checkpoint
from trainer.cli import main as trainer_main
from trainer.data import load_dataset
from trainer.knn import embed as knn_embed
from trainer.models import build_model
from tests.helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
AND_RUN = ["--rounds", "2", "--epochs-per-round", "2", "--eval-every", "1", "--seed", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(*args):
    return CliRunner().invoke(trainer_main, [str(a) for a in args])


def _nbr_index(*args):
    return CliRunner().invoke(nbr_index_main, [str(a) for a in args])


def _ok(result):
    assert result.exit_code == 0, result.output + result.stderr
    return result


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def and_run(tmp_path_factory) -> Path:
    """AND on digits, 3 rounds x 2 epochs, kNN after every epoch (deterministic: seed 0, 1 thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("and") / "run"
    _ok(_trainer("run", "--run-dir", run, *AND_RUN))
    torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="module")
def instance_run(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("instance") / "run"
    _ok(_trainer("run", "--run-dir", run, "--method", "instance", *AND_RUN))
    torch.set_num_threads(threads)
    return run


def _runs_own_model(run: Path):
    state = load_checkpoint(checkpoint_path(str(run)))
    data = load_dataset("digits")
    model = build_model("smallcnn", data.image_size, 128)
    model.load_state_dict(state["model"])
    return model, data, state


# ---------------------------------------------------------------- export and load_model / embed

def test_export_loads_back_to_the_runs_own_features_exactly(and_run, tmp_path):
    model, data, _ = _runs_own_model(and_run)
    # Same batch size on both sides: a CPU convolution may pick another kernel for another batch shape.
    expected, _ = knn_embed(model, data.eval_batches("test", 64), torch.device("cpu"))
    backbone_expected, _ = knn_embed(model, data.eval_batches("test", 64), torch.device("cpu"), head=False)

    out = tmp_path / "model.pt"
    result = _ok(_trainer("export", "--run-dir", and_run, "--out", out))
    assert f"to {out}" in result.output
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"state_dict", "config"}
    config = saved["config"]
    assert (config["arch"], config["image_size"], config["dim"], config["layout"]) == ("smallcnn", 8, 128, "and")
    assert config["mean"] == pytest.approx(list(data.mean)) and config["std"] == pytest.approx(list(data.std))
    assert config["round"] == 3 and config["classes"] == data.classes
    assert saved["state_dict"].keys() == model.state_dict().keys()

    for source in (out, and_run, and_run / "checkpoint.pt"):     # an export file, the run dir, its checkpoint
        loaded = trainer.load_model(str(source), device="cpu")
        assert not loaded.training
        features = trainer.embed(loaded, data.test.images, batch_size=64)
        assert features.shape == (297, 128) and torch.equal(features, expected)
        assert torch.equal(trainer.embed(loaded, data.test.images, batch_size=64, head=False), backbone_expected)

    backbone = tmp_path / "backbone.pt"
    _ok(_trainer("export", "--run-dir", and_run, "--out", backbone, "--backbone-only"))
    saved = torch.load(backbone, weights_only=True)
    fresh = build_model("smallcnn", 8, 128).backbone
    fresh.load_state_dict(saved["state_dict"], strict=True)
    assert saved["config"]["backbone_only"] is True
    one_line_error(_trainer("embed", "--model", backbone, "--dataset", "digits", "--out", tmp_path / "x.npy"),
                   "is a backbone-only export")


@pytest.mark.parametrize("arch, size", [("resnet18", 8), ("resnet50", 8), ("resnet18", 96)])
def test_torchvision_layout_loads_strictly_into_torchvision_resnets(arch, size):
    """Every ResNet the trainer builds maps onto torchvision's (CIFAR stem replaced as the README
    shows for <= 64 px) with strict=True, and computes the same features."""
    import torchvision

    from trainer.export import from_torchvision_keys, to_torchvision_keys

    torch.manual_seed(0)
    ours = build_model(arch, size, 128).eval()
    weights = ours.state_dict()
    for backbone_only in (False, True):
        net = getattr(torchvision.models, arch)(num_classes=128)
        if size <= 64:
            net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = torch.nn.Identity()
        if backbone_only:
            net.fc = torch.nn.Identity()
        net.load_state_dict(to_torchvision_keys(weights, backbone_only), strict=True)
        images = torch.rand(2, 3, size, size)
        with torch.no_grad():
            theirs = net.eval()(images)
            mine = ours.embed(images) if backbone_only else ours(images)
        if not backbone_only:
            theirs = torch.nn.functional.normalize(theirs, dim=1)
        torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-6)
    assert from_torchvision_keys(to_torchvision_keys(weights, False)).keys() == weights.keys()


@pytest.mark.slow
@pytest.mark.timeout(1800)   # two ResNet18 epochs: about 2 minutes on 2 idle cores, over 10 on busy ones
def test_torchvision_export_of_a_real_resnet18_run(tmp_path):
    import torchvision

    run = tmp_path / "run"
    _ok(_trainer("run", "--run-dir", run, "--arch", "resnet18", "--method", "instance", "--rounds", "1",
                 "--epochs-per-round", "1"))
    out = tmp_path / "resnet18.pt"
    _ok(_trainer("export", "--run-dir", run, "--out", out, "--format", "torchvision"))
    net = torchvision.models.resnet18(num_classes=128)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    net.load_state_dict(torch.load(out, weights_only=True)["state_dict"], strict=True)
    loaded = trainer.load_model(str(out))                   # the torchvision layout loads back too
    data = load_dataset("digits")
    images = data.test.images[:16]
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(net.eval()(torch.stack([_prepared(loaded, i) for i in images])), dim=1)
    torch.testing.assert_close(theirs, trainer.embed(loaded, images), rtol=0, atol=1e-6)


def _prepared(model, image):
    from trainer.augment import prepare_eval

    return prepare_eval(image[None], model.input_spec.augment_spec)[0]


@pytest.mark.parametrize("args, message", [
    (["--run-dir", "{tmp}/none"], "holds no checkpoint.pt"),
    (["--run-dir", "{run}", "--format", "torchvision"], "--format torchvision is for resnet18 and resnet50"),
    (["--run-dir", "{run}", "--out", "{run}/config.yaml"], "already exists"),
])
def test_export_bad_input_is_one_line_and_writes_nothing(and_run, tmp_path, args, message):
    (tmp_path / "none").mkdir()
    args = [a.format(tmp=tmp_path, run=and_run) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out.pt")]
    before = _tree(and_run)
    one_line_error(_trainer("export", *args), message)
    assert not (tmp_path / "out.pt").exists() and _tree(and_run) == before


# ---------------------------------------------------------------- trainer embed

def test_embed_of_the_training_set_is_a_fresh_recomputation_close_to_the_memory_bank(and_run, tmp_path):
    model, data, state = _runs_own_model(and_run)
    expected, labels = knn_embed(model, data.eval_batches("train", 256), torch.device("cpu"))
    out = tmp_path / "train.npy"
    result = _ok(_trainer("embed", "--run-dir", and_run, "--dataset", "digits", "--out", out))   # batches of 256
    assert f"written: {out}" in result.output
    features = np.load(out)
    assert features.shape == (1500, 128) and features.dtype == np.float32
    assert np.array_equal(features, expected.numpy())
    assert np.array_equal(np.load(tmp_path / "train.labels.npy"), labels.numpy())
    # The memory bank holds an EMA of augmented views of the same images: each row is closer to its
    # own sample's fresh feature than to another sample's.
    bank = state["memory"].numpy()
    own = (features * bank).sum(1)
    other = (features * np.roll(bank, 1, axis=0)).sum(1)
    assert own.mean() > 0.9 and (own > other).mean() > 0.8


def _image_folder(root: Path, layout: dict[str, int] | int, size: int = 12) -> list[Path]:
    """Class sub-folders {class: count} or, given a count, a flat folder; distinct random images."""
    rng = np.random.default_rng(len(str(root)))
    paths = []
    groups = layout.items() if isinstance(layout, dict) else [("", layout)]
    for name, count in groups:
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = folder / f"img{i}.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


def test_embed_folders_with_and_without_classes(and_run, tmp_path):
    model = trainer.load_model(str(and_run))
    flat = _image_folder(tmp_path / "flat", 7)
    _ok(_trainer("embed", "--run-dir", and_run, "--data-root", tmp_path / "flat", "--out", tmp_path / "flat.npy",
                 "--batch-size", "3", "--workers", "0"))
    assert np.array_equal(np.load(tmp_path / "flat.npy"),
                          trainer.embed(model, [str(p) for p in flat], batch_size=3).numpy())
    assert not (tmp_path / "flat.labels.npy").exists()
    assert (tmp_path / "flat.files.txt").read_text().split() == [str(p) for p in flat]

    classes = _image_folder(tmp_path / "data" / "val", {"cat": 3, "dog": 4})   # the ImageNet layout's val/
    _ok(_trainer("embed", "--run-dir", and_run, "--data-root", tmp_path / "data", "--split", "test",
                 "--out", tmp_path / "val.npy", "--workers", "2"))
    assert np.array_equal(np.load(tmp_path / "val.npy"), trainer.embed(model, [Image.open(p) for p in classes]).numpy())
    assert np.load(tmp_path / "val.labels.npy").tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_embed_into_a_store_gives_a_snapshot_nbr_index_rebuilds_and_queries(and_run, tmp_path):
    _image_folder(tmp_path / "images", {"a": 5, "b": 5, "c": 5})
    store_dir = tmp_path / "store"
    _ok(_trainer("embed", "--run-dir", and_run, "--data-root", tmp_path / "images", "--out", store_dir,
                 "--workers", "0"))
    store = Store.open(str(store_dir))
    assert store.complete_feature_rounds() == [0] and store.read_labels().tolist() == [0] * 5 + [1] * 5 + [2] * 5
    _ok(_nbr_index("rebuild", "--store", store_dir, "--round", "1", "--quiet"))
    published = store.read_neighbourhoods(1)
    answer = json.loads(_ok(_nbr_index("query", "--store", store_dir, "--index", "4", "--k", "1", "--json")).output)
    assert answer["round"] == 0 and answer["queries"][0]["neighbours"] == published.neighbours[4].tolist()
    again = _trainer("embed", "--run-dir", and_run, "--data-root", tmp_path / "images", "--out", store_dir)
    one_line_error(again, "already holds features/round-0")


def test_embed_into_a_store_a_live_run_writes_is_refused_and_leaves_it_as_it_was(and_run, tmp_path):
    """embed writes a store as its one writer (storage.lease), as a training run does: not beside one."""
    from storage import take_writer_lease

    _image_folder(tmp_path / "images", {"a": 5, "b": 5})
    store_dir = tmp_path / "store"
    embed = ["embed", "--run-dir", and_run, "--data-root", tmp_path / "images", "--out", store_dir, "--workers", "0"]
    _ok(_trainer(*embed))
    assert not (store_dir / "writer-lease.json").exists()   # released when done
    lease = take_writer_lease(str(store_dir), str(tmp_path / "run"), "a-live-run")
    try:
        before = sorted(str(path.relative_to(store_dir)) for path in store_dir.rglob("*"))
        one_line_error(_trainer(*embed, "--round", "1"), f"run dir {tmp_path / 'run'}")
        assert sorted(str(path.relative_to(store_dir)) for path in store_dir.rglob("*")) == before
    finally:
        lease.release()
    _ok(_trainer(*embed, "--round", "1"))
    assert Store.open(str(store_dir)).complete_feature_rounds() == [0, 1]


def test_embed_shows_a_progress_bar_on_a_terminal_and_plain_lines_elsewhere(and_run, tmp_path):
    command = [sys.executable, "-m", "trainer.cli", "embed", "--run-dir", str(and_run), "--dataset", "digits",
               "--batch-size", "50", "--out", str(tmp_path / "tty.npy")]
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # a 100-column terminal
    proc = subprocess.Popen(command, env=ENV, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:               # the terminal closed: the process is done
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert proc.wait(timeout=120) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    assert "embedding batch:" in text and "%|" in text and "/30" in text        # tqdm's bar over 30 batches
    assert (tmp_path / "tty.npy").exists()

    from trainer.progress import Progress

    lines = []
    with Progress(3, "embedding batch", lines.append, terminal=False, every_s=0.0) as progress:
        for done in range(3):
            progress.update(1, lambda: f"{(done + 1) * 50} images")  # noqa: B023 (update calls it at once)
    assert lines == ["embedding batch 1/3  50 images", "embedding batch 2/3  100 images",
                     "embedding batch 3/3  150 images"]


@pytest.mark.parametrize("args, message", [
    (["--dataset", "digits"], "give one of --run-dir DIR or --model FILE"),
    (["--run-dir", "{run}"], "give --dataset NAME or --data-root FOLDER"),
    (["--run-dir", "{run}", "--dataset", "digits", "--out", "{run}/store"], "was created for dataset_id='digits:"),
    (["--run-dir", "{run}", "--data-root", "{tmp}/empty"], "holds no images"),
    (["--run-dir", "{run}", "--data-root", "{tmp}/mixed"], "holds both images and sub-folders"),
    (["--run-dir", "{run}", "--data-root", "{tmp}/mixed", "--split", "test"], "has no test/ or val/ folder"),
    (["--run-dir", "{run}", "--data-root", "{tmp}/corrupt", "--workers", "2"], "cannot decode image"),
    (["--run-dir", "{run}", "--dataset", "digits", "--out", "{tmp}/existing.npy"], "already exists"),
    (["--run-dir", "{run}", "--dataset", "digits", "--out", "{tmp}/nowhere/x.npy"], "does not exist"),
])
def test_embed_bad_input_is_one_line_and_writes_nothing(and_run, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    _image_folder(tmp_path / "mixed", 2)
    _image_folder(tmp_path / "mixed" / "sub", 1)
    (tmp_path / "existing.npy").write_bytes(b"keep")
    _image_folder(tmp_path / "corrupt", 3)
    (tmp_path / "corrupt" / "img1.png").write_bytes(b"not a png")
    args = [a.format(tmp=tmp_path, run=and_run) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out.npy")]
    before, run_before = _tree(tmp_path), _tree(and_run)
    one_line_error(_trainer("embed", *args), message)
    assert _tree(tmp_path) == before and _tree(and_run) == run_before
    assert (tmp_path / "existing.npy").read_bytes() == b"keep"


# ---------------------------------------------------------------- nbr-index query

def test_query_by_index_and_by_vectors_equals_brute_force_on_the_runs_store(and_run, tmp_path):
    store = Store.open(str(and_run / "store"))
    bank = store.feature_reader(2).read_all()
    labels = store.read_labels()
    neighbours, similarities, _ = brute_force_knn_entropy(bank, 5, 0.1)
    rows = [0, 17, 1499, 17]
    answer = json.loads(_ok(_nbr_index("query", "--store", and_run / "store", *sum((["--index", r] for r in rows), []),
                                       "--k", "5", "--json")).output)
    assert answer["round"] == 2 and answer["k"] == 5             # the latest complete snapshot by default
    for row, found in zip(rows, answer["queries"]):
        assert found["query"] == f"index {row}" and found["label"] == int(labels[row])
        assert found["neighbours"] == neighbours[row].tolist()
        assert found["similarities"] == pytest.approx(similarities[row], abs=2e-6)
        assert found["labels"] == labels[neighbours[row]].tolist()

    queries = np.random.default_rng(3).standard_normal((4, 128)).astype(np.float32) * 3.0   # not unit rows
    np.save(tmp_path / "q.npy", queries)
    unit = queries.astype(np.float64) / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    answer = json.loads(_ok(_nbr_index("query", "--store", and_run / "store", "--round", "1",
                                       "--vectors", tmp_path / "q.npy", "--k", "3", "--json")).output)
    bank1 = store.feature_reader(1).read_all().astype(np.float64)
    sims1 = unit @ bank1.T
    expected = np.argsort(-sims1, axis=1, kind="stable")[:, :3]        # ties -> lower index
    assert answer["round"] == 1
    for i, found in enumerate(answer["queries"]):
        assert found["neighbours"] == expected[i].tolist()
        assert found["similarities"] == pytest.approx(sims1[i, expected[i]], abs=2e-6)
    text = _ok(_nbr_index("query", "--store", and_run / "store", "--index", "0", "--k", "2")).output
    assert text.splitlines()[0] == f"index 0 (label {labels[0]}): 2 nearest of features/round-2"
    assert text.splitlines()[2].split()[:2] == ["1", str(neighbours[0, 0])]


@pytest.mark.parametrize("args, message", [
    (["--index", "1500"], "index 1500 is not a sample of this store: indices are 0..1499"),
    (["--index", "-1"], "index -1 is not a sample"),
    (["--index", "3", "--k", "0"], "k must satisfy 1 <= k <= 1499"),
    (["--index", "3", "--k", "1500"], "k must satisfy 1 <= k <= 1499 (N = 1500, self excluded)"),
    (["--vectors", "{tmp}/wide.npy"], "query vectors have dimension 64, the store's features have 128"),
    (["--vectors", "{tmp}/missing.npy"], "does not exist"),
    (["--vectors", "{tmp}/text.npy"], "is not a .npy array file"),
    (["--index", "3", "--vectors", "{tmp}/wide.npy"], "not both"),
    ([], "give either sample indices"),
    (["--index", "3", "--round", "7"], "features round 7 is not complete"),
])
def test_query_bad_input_is_one_line_and_changes_nothing(and_run, tmp_path, args, message):
    np.save(tmp_path / "wide.npy", np.ones((2, 64), dtype=np.float32))
    (tmp_path / "text.npy").write_text("not an array")
    before = _tree(and_run / "store")
    one_line_error(_nbr_index("query", "--store", and_run / "store",
                              *[a.format(tmp=tmp_path) for a in args]), message)
    assert _tree(and_run / "store") == before


# ---------------------------------------------------------------- trainer report

def test_report_of_one_run_and_of_and_against_instance(and_run, instance_run, tmp_path):
    from trainer.run_report import load_run

    summary = json.loads((and_run / "summary.json").read_text())
    record = load_run(str(and_run))
    steps, values = record.knn_curve()
    evaluated = [(r["round"] * 2 + r["epoch"] + 1, r["knn_top1"]) for r in summary["epochs"] if "knn_top1" in r]
    ends = [((r["round"] + 1) * 2, r["knn_top1"]) for r in summary["rounds"]]
    # Every epoch is evaluated; the last epoch of a round and the round's end are the same point.
    assert all(dict(evaluated)[step] == knn for step, knn in ends)
    assert list(zip(steps, values)) == sorted(dict(evaluated + ends).items()) and steps == [1, 2, 3, 4, 5, 6]
    assert sorted(record.entropies) == [1, 2] and record.entropies[1].shape == (1500,)

    result = _ok(_trainer("report", and_run))
    for name in ("knn.png", "curriculum.png", "entropy.png"):
        assert (and_run / name).stat().st_size > 10_000
    table = (and_run / "report.md").read_text()
    assert f"| {summary['final_knn_top1']:.2f}% |" in table and table.strip() in result.output

    out = tmp_path / "both"
    _ok(_trainer("report", and_run, instance_run, "--out", out))
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| and")
            or line.startswith("| instance")]
    assert [r.split(" | ")[0] for r in rows] == ["| and", "| instance"]
    instance = json.loads((instance_run / "summary.json").read_text())
    assert f"{instance['final_knn_top1']:.2f}%" in rows[1] and "| 0 | - |" in rows[1]   # no anchors, no consistency
    for name in ("knn.png", "curriculum.png", "entropy.png"):
        assert (out / name).stat().st_size > 10_000


def test_report_bad_input_is_one_line_and_writes_nothing(and_run, instance_run, tmp_path):
    one_line_error(_trainer("report", tmp_path), "has no summary.json")
    one_line_error(_trainer("report", and_run, instance_run), "several runs need --out DIR")
    one_line_error(_trainer("report", and_run, tmp_path, "--out", tmp_path / "out"), "has no summary.json")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_events_hold_the_logged_scalars(and_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = json.loads((and_run / "summary.json").read_text())
    events = EventAccumulator(str(and_run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    epochs = summary["epochs"]
    assert scalars("train/loss") == [(i + 1, pytest.approx(row["loss"], rel=1e-6)) for i, row in enumerate(epochs)]
    assert [v for _, v in scalars("train/lr")] == pytest.approx([row["lr"] for row in epochs])
    assert [v for _, v in scalars("train/images_per_s")] == pytest.approx([row["images_per_s"] for row in epochs])
    assert scalars("round/anchors") == [(0, 0), (1, 750), (2, 1500)]
    assert [v for _, v in scalars("round/knn_top1")] == pytest.approx([r["knn_top1"] for r in summary["rounds"]])
    assert [s for s, _ in scalars("round/consistency")] == [1, 2]
    from trainer.run_report import load_run

    assert scalars("eval/knn_top1") == [(s, pytest.approx(v)) for s, v in zip(*load_run(str(and_run)).knn_curve())]
    histograms = events.Histograms("round/entropy")
    assert [h.step for h in histograms] == [1, 2] and all(h.histogram_value.num == 1500 for h in histograms)


@pytest.mark.slow
@pytest.mark.timeout(1800)   # three short runs in subprocesses
def test_no_tensorboard_flag_and_no_tensorboard_package_write_no_events_and_train_the_same(tmp_path):
    args = ["-m", "trainer.cli", "run", "--method", "instance", "--rounds", "1", "--epochs-per-round", "1"]
    blocked = ("import sys, runpy; sys.modules['tensorboard'] = None; sys.argv = ['trainer'] + sys.argv[1:]; "
               "runpy.run_module('trainer.cli', run_name='__main__')")
    runs = {"with": [sys.executable, *args, "--run-dir", str(tmp_path / "with")],
            "flag": [sys.executable, *args, "--run-dir", str(tmp_path / "flag"), "--no-tensorboard"],
            "package": [sys.executable, "-c", blocked, *args[2:], "--run-dir", str(tmp_path / "package")]}
    outputs = {name: subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
               for name, cmd in runs.items()}
    for done in outputs.values():
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "with" / "tensorboard").is_dir()
    assert not (tmp_path / "flag" / "tensorboard").exists() and not (tmp_path / "package" / "tensorboard").exists()
    banks = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["memory"] for name in runs]
    assert all(torch.equal(banks[0], bank) for bank in banks[1:])

    def without_timings(text):
        """The per-epoch and per-round lines without their seconds and images/s."""
        return [[part for part in line.split("  ") if not re.search(r"(\ds\)?|img/s)$", part)]
                for line in text.splitlines() if line.startswith("round ")]

    assert without_timings(outputs["package"].stdout) == without_timings(outputs["with"].stdout)

"""bench/accuracy.py's summary (mean and sample std over seeds, a dash where no run has a value),
its data subset, its methods' flags, and the import of a published table."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "bench" / "accuracy.py")
accuracy = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = accuracy   # dataclasses look their module up there
spec.loader.exec_module(accuracy)


def _result(final, recomputed, seconds=10.0):
    rounds = [{"round": r, "knn_top1": final - 4 + r, "anchors": 0, "consistency": None} for r in range(5)]
    return {"rounds": rounds, "final_knn_top1": final, "best_epoch_knn_top1": final + 0.5,
            "linear_probe_top1": None, "seconds": seconds, "images_per_s": 100.0,
            **({} if recomputed is None else {"recomputed_knn_top1": recomputed})}


def test_summary_takes_the_recomputed_knn_over_seeds_and_marks_runs_without_it():
    protocol = accuracy.PROTOCOLS["cifar10-10k"]
    runs = []
    for seed, (final, recomputed) in enumerate([(47.0, 48.5), (47.4, 49.1), (47.2, 48.8)]):
        runs.append(accuracy.Run("project", "instance", seed, f"/nowhere/{seed}", result=_result(final, recomputed)))
    # A result written before the column existed has no recomputed value at all.
    runs.append(accuracy.Run("reference", "instance", 0, "/nowhere/r0", result=_result(46.0, None)))
    for seed, recomputed in enumerate([49.0, None, 49.4]):
        runs.append(accuracy.Run("project", "and", seed, f"/nowhere/a{seed}", result=_result(47.0, recomputed)))
    text, table = accuracy.summarise(runs, protocol, [0, 1, 2])

    mean, std = table["project/instance"]["recomputed_knn_top1"]
    assert mean == pytest.approx(48.8)
    assert std == pytest.approx(statistics.stdev([48.5, 49.1, 48.8]))
    project_row = next(line for line in text.splitlines() if line.startswith("| project | instance |"))
    assert "| 48.80 ± 0.30 |" in project_row
    reference_row = next(line for line in text.splitlines() if line.startswith("| reference | instance |"))
    cells = [c.strip() for c in reference_row.strip("|").split("|")]
    header = next(line for line in text.splitlines() if line.startswith("| implementation |"))
    column = [c.strip() for c in header.strip("|").split("|")].index("final kNN, recomputed train features")
    assert cells[column] == "-"
    and_row = next(line for line in text.splitlines() if line.startswith("| project | and |"))
    assert [c.strip() for c in and_row.strip("|").split("|")][column] == "49.20 ± 0.28 (2 of 3)"
    assert table["reference/instance"]["recomputed_knn_top1"][0] != table["reference/instance"]["recomputed_knn_top1"][0]


def test_the_cifar_subset_made_from_a_relative_data_dir_resolves_from_anywhere(tmp_path, monkeypatch):
    # A relative --data-dir once made the subset's symlinks relative to it, and every image a
    # missing file to the trainer, which runs elsewhere.
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = tmp_path / "data" / "cifar10" / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                (folder / f"{i:04d}.jpg").write_bytes(f"{split}/{name}/{i}".encode())
    monkeypatch.chdir(tmp_path)
    subset = accuracy.ensure_data(accuracy.PROTOCOLS["cifar10-10k"], "data", log=print)
    monkeypatch.chdir(tmp_path / "data" / "cifar10" / "train")
    assert Path(subset).is_absolute()
    assert (Path(subset) / "train" / "dog" / "0002.jpg").read_bytes() == b"train/dog/2"
    assert sorted(p.name for p in (Path(subset) / "test" / "cat").iterdir()) == ["0000.jpg", "0001.jpg", "0002.jpg"]


@pytest.mark.parametrize("method", accuracy.METHODS)
def test_every_method_is_a_trainer_run_that_validates(method):
    """Each method's flags parse as `trainer run` options and give a valid config of that method."""
    from trainer.cli import build_config, run
    from trainer.config import validate

    context = run.make_context("run", [*accuracy.METHOD_FLAGS[method], "--run-dir", "unused"])
    flags = {k: v for k, v in context.params.items()
             if k not in ("config_file", "resume", "world_size", "max_restarts", "master_port", "check_replicas")}
    cfg = build_config(flags, None, resume=False)
    validate(cfg)
    method_flags = accuracy.METHOD_FLAGS[method]
    assert cfg.method == method_flags[method_flags.index("--method") + 1]
    assert (cfg.selection == "oracle") == method.endswith("-oracle")


def test_a_published_table_imports_back_as_the_same_runs_under_their_seeds(tmp_path):
    protocol = accuracy.PROTOCOLS["cifar10-10k"]
    runs = [accuracy.Run("project", "and", seed, "/nowhere", result=_result(47.0 + seed, 49.0)) for seed in (0, 2)]
    runs.append(accuracy.Run("reference", "instance", 1, "/nowhere", result=_result(46.0, None)))
    _, table = accuracy.summarise(runs, protocol, [0, 1, 2])
    assert table["project/and"]["seed_list"] == [0, 2]
    published = tmp_path / "accuracy.json"
    published.write_text(json.dumps({"protocol": dataclasses.asdict(protocol), "seeds": [0, 1, 2], "groups": table}))
    out_dir = tmp_path / "runs"
    # A run already in the out-dir is kept, not overwritten by the published one.
    (out_dir / "project-and-seed2").mkdir(parents=True)
    (out_dir / "project-and-seed2" / "result.json").write_text(json.dumps(_result(50.0, 51.0)))

    assert accuracy.import_published(str(published), protocol, str(out_dir), log=lambda _: None) == 2
    assert json.loads((out_dir / "project-and-seed0" / "result.json").read_text()) == _result(47.0, 49.0)
    assert json.loads((out_dir / "reference-instance-seed1" / "result.json").read_text()) == _result(46.0, None)
    assert json.loads((out_dir / "project-and-seed2" / "result.json").read_text())["final_knn_top1"] == 50.0
    assert not (out_dir / "project-and-seed1").exists()


def test_an_import_refuses_another_protocol_runs_of_unknown_seed_and_other_files(tmp_path):
    protocol = accuracy.PROTOCOLS["cifar10-10k"]
    # Written before seed_list: three runs for three seeds can be placed, one cannot, and then
    # nothing is imported, not even the three.
    complete = {"values": [_result(47.0, 49.0)] * 3}
    partial = {"values": [_result(47.0, 49.0)]}
    published = tmp_path / "accuracy.json"
    published.write_text(json.dumps({"protocol": dataclasses.asdict(protocol), "seeds": [0, 1, 2],
                                     "groups": {"project/instance": complete, "project/and": partial}}))
    with pytest.raises(click.ClickException, match="1 runs for seeds .* no seed_list"):
        accuracy.import_published(str(published), protocol, str(tmp_path / "runs"), log=print)
    with pytest.raises(click.ClickException, match="not this --protocol"):
        accuracy.import_published(str(published), accuracy.PROTOCOLS["digits"], str(tmp_path / "runs"), log=print)
    not_a_table = tmp_path / "summary.json"
    not_a_table.write_text(json.dumps({"rounds": []}))
    with pytest.raises(click.ClickException, match="not an accuracy.json"):
        accuracy.import_published(str(not_a_table), protocol, str(tmp_path / "runs"), log=print)
    assert not (tmp_path / "runs").exists()

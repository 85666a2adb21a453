"""The trainer end to end: schedule, configuration, CLI errors, short real runs on digits,
resume after SIGKILL, and the --index service mode against a real `nbr-index serve`."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trainer.cli import main
from trainer.config import ConfigError, TrainConfig, config_from_dict, load_config_file, resolve
from trainer.schedule import lr_at, make_optimizer
from tests.helpers import kill_when_checkpointed, one_line_error

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses: one thread each, so that two runs compare bit for bit and do not fight over 2 cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(autouse=True)
def one_thread_and_restored_determinism():
    """In-process runs use one thread too (2 shared cores: oversubscribed threads spin) and
    leave torch's global deterministic flag as they found it."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


# ---------------------------------------------------------------- schedule

def step_policy(epoch: int, base_lr: float = 0.03, offset: int = 80, step: int = 40, rate: float = 0.1) -> float:
    """The authors' released StepPolicy.update (Raymond-sci/AND packages/lr_policy/step.py) with
    base.yaml's lr_decay_offset 80, lr_decay_step 40, lr_decay_rate 0.1."""
    if epoch < offset:
        return base_lr
    return base_lr * (rate ** ((epoch - offset) // step))


def test_default_lr_schedule_equals_the_released_step_policy_epoch_by_epoch():
    cfg = TrainConfig()
    ours = [lr_at(e, 200, cfg.lr, cfg.lr_milestones, cfg.lr_gamma) for e in range(200)]
    assert ours == pytest.approx([step_policy(e) for e in range(200)], rel=1e-12)
    assert lr_at(119, 200, 0.03) == 0.03 and lr_at(120, 200, 0.03) == pytest.approx(3e-3)


def test_lr_schedule_of_the_papers_text_200_epochs():
    lrs = {e: lr_at(e, 200, 0.03, (0.4, 0.6, 0.8)) for e in (0, 79, 80, 119, 120, 159, 160, 199)}
    assert lrs == pytest.approx({0: 0.03, 79: 0.03, 80: 0.003, 119: 0.003, 120: 3e-4, 159: 3e-4,
                                 160: 3e-5, 199: 3e-5})


def test_lr_schedule_scales_to_short_rounds():
    assert [lr_at(e, 10, 0.03, (0.4, 0.6, 0.8)) for e in range(10)] == pytest.approx(
        [0.03] * 4 + [3e-3] * 2 + [3e-4] * 2 + [3e-5] * 2)
    assert [lr_at(e, 10, 0.03) for e in range(10)] == pytest.approx([0.03] * 6 + [3e-3] * 2 + [3e-4] * 2)
    assert [lr_at(e, 1, 0.03) for e in range(1)] == pytest.approx([0.03])
    # The authors' StepPolicy reading (first decay at 120 of 200): milestones 0.6, 0.8.
    assert [lr_at(e, 200, 0.03, (0.6, 0.8)) for e in (119, 120, 160)] == pytest.approx([0.03, 3e-3, 3e-4])


def test_optimizer_is_nesterov_sgd_with_weight_decay():
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], 0.03)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.03, 0.9, 5e-4, True)


# ---------------------------------------------------------------- configuration

def test_config_files_yaml_and_toml_with_flags_overriding(tmp_path):
    (tmp_path / "a.yaml").write_text("rounds: 2\nbatch-size: 64\nlr_milestones: [0.5]\n")
    (tmp_path / "a.toml").write_text('rounds = 3\nmethod = "instance"\ntau = 0.07\n')
    cfg = config_from_dict({**load_config_file(str(tmp_path / "a.yaml")), "rounds": 5})
    assert (cfg.rounds, cfg.batch_size, cfg.lr_milestones) == (5, 64, [0.5])
    cfg = config_from_dict(load_config_file(str(tmp_path / "a.toml")))
    assert (cfg.rounds, cfg.method, cfg.tau) == (3, "instance", 0.07)


def test_unknown_or_mistyped_config_keys_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown config key\\(s\\): epochs, learning_rate"):
        config_from_dict({"epochs": 3, "learning_rate": 0.1})
    with pytest.raises(ConfigError, match="config key 'rounds' needs a int, got 'many'"):
        config_from_dict({"rounds": "many"})


def test_resolve_fills_dataset_defaults():
    cfg = resolve(TrainConfig(), now="T")
    assert (cfg.epochs_per_round, cfg.run_dir, cfg.store) == (30, "runs/and-digits-smallcnn-T", "runs/and-digits-smallcnn-T/store")
    assert resolve(TrainConfig(dataset="cifar10", data_root="x", run_dir="r")).epochs_per_round == 200


# ---------------------------------------------------------------- CLI bad input

def _cli(args):
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--arch", "vgg16"], "unknown arch 'vgg16'"),
    (["--method", "simclr"], "unknown method 'simclr'"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--k", "1500"], "--k 1500 must be smaller than the training set size N = 1500"),
    (["--batch-size", "4096"], "--batch-size 4096 is larger than the training set (N = 1500)"),
    (["--dataset", "cifar10"], "--dataset cifar10 needs --data-root"),
    (["--index", "remote"], "unknown index mode 'remote'"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(tmp_path, args, message):
    run = tmp_path / "run"
    one_line_error(_cli(["run", "--run-dir", str(run), *args]), message)
    assert not run.exists()


def test_bad_data_roots_exit_2_with_one_line_and_write_nothing(tmp_path):
    run = tmp_path / "run"
    (tmp_path / "data" / "test" / "a").mkdir(parents=True)
    one_line_error(_cli(["run", "--run-dir", str(run), "--dataset", "imagefolder", "--data-root",
                         str(tmp_path / "data")]), "has no train/ folder")
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    one_line_error(_cli(["run", "--run-dir", str(run), "--dataset", "imagefolder", "--data-root",
                         str(tmp_path / "data")]), "holds no images")
    assert not run.exists()


def test_an_image_folder_without_a_test_split_trains_and_skips_knn_with_a_note(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / "train" / name / f"{i}.png")
    run = tmp_path / "run"
    result = _cli(["run", "--run-dir", str(run), "--dataset", "imagefolder", "--data-root", str(tmp_path / "data"),
                   "--rounds", "1", "--epochs-per-round", "1", "--batch-size", "8", "--knn-k", "5", "--eval-every", "1"])
    assert result.exit_code == 0, result.output + result.stderr
    assert f"no test/ or val/ folder in {tmp_path / 'data'}: training without kNN evaluation" in result.output
    assert "round 1 done: no test split" in result.output
    summary = json.loads((run / "summary.json").read_text())
    assert [r["knn_top1"] for r in summary["rounds"]] == [None, None] and summary["final_knn_top1"] is None
    assert summary["final_knn_top1_recomputed"] is None
    assert [r["anchors"] for r in summary["rounds"]] == [0, 32] and summary["dataset"]["n_test"] == 0
    assert (run / "knn_per_round.png").exists()


def test_unknown_config_file_key_and_resume_without_checkpoint(tmp_path):
    (tmp_path / "c.yaml").write_text("rounds: 2\nwarmup: 5\n")
    one_line_error(_cli(["run", "--run-dir", str(tmp_path / "run"), "--config", str(tmp_path / "c.yaml")]),
                   "unknown config key(s): warmup")
    one_line_error(_cli(["run", "--run-dir", str(tmp_path / "run"), "--resume"]), "no checkpoint at")
    one_line_error(_cli(["run", "--resume"]), "--resume needs the --run-dir")
    assert not (tmp_path / "run").exists()


def test_help_lists_the_flags():
    result = _cli(["run", "--help"])
    assert result.exit_code == 0, result.output
    # The option names that begin the lines of the Options section (`--x TYPE` or `--x / --no-x`):
    # a bare substring test would take --k from --knn-k or --lr from a help text.
    listed = set()
    for match in re.finditer(r"^ {2}(--[\w-]+)(?: / (--[\w-]+))?", result.output.split("Options:", 1)[1], re.M):
        listed.update(name for name in match.groups() if name)
    for flag in ("--dataset", "--data-root", "--arch", "--method", "--rounds", "--epochs-per-round", "--batch-size",
                 "--lr", "--k", "--tau", "--store", "--seed", "--device", "--run-dir", "--index", "--eval-every",
                 "--config", "--resume", "--index-timeout"):
        assert flag in listed, f"{flag} is not an option of `trainer run --help`: {sorted(listed)}"


def test_speed_command_reports_and_against_supervised():
    result = _cli(["speed", "--size", "8", "--n", "64", "--batch-size", "8", "--steps", "1"])
    assert result.exit_code == 0, result.output
    match = re.fullmatch(r"smallcnn 8px batch 8 N=64 fp32 deterministic cpu threads \d+: supervised (\d+) images/s, "
                         r"AND (\d+) images/s, AND / supervised = (\d+\.\d\d)", result.output.strip())
    assert match, result.output
    supervised, and_rate, ratio = int(match[1]), int(match[2]), float(match[3])
    assert supervised > 0 and and_rate > 0 and abs(ratio - and_rate / supervised) < 0.02


# ---------------------------------------------------------------- short real runs

SHORT = ["--rounds", "2", "--epochs-per-round", "1", "--seed", "0"]


@pytest.mark.parametrize("method, anchors", [("and", [0, 750, 1500]), ("instance", [0, 0, 0]),
                                             ("and-oneoff", [0, 1500, 1500])])
def test_short_digits_run_writes_a_well_formed_summary(tmp_path, method, anchors):
    run = tmp_path / "run"
    result = _cli(["run", "--run-dir", str(run), "--method", method, *SHORT])
    assert result.exit_code == 0, result.output + result.stderr
    assert f"summary: {run / 'summary.json'}" in result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["method"] == method and summary["config"]["epochs_per_round"] == 1
    saved = config_from_dict(load_config_file(str(run / "config.yaml")))     # config.yaml feeds --config
    assert saved.to_dict() == summary["config"]
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert [r["anchors"] for r in summary["rounds"]] == anchors
    for row in summary["rounds"]:
        assert set(row) == {"round", "knn_top1", "best_epoch_knn_top1", "best_epoch", "anchors", "consistency",
                            "seconds"}
        assert isinstance(row["knn_top1"], float) and row["seconds"] > 0
        assert (row["consistency"] is None) == (row["anchors"] == 0)
        # One epoch per round: its last epoch is its best.
        assert (row["best_epoch"], row["best_epoch_knn_top1"]) == (0, row["knn_top1"])
    # 10 classes: chance is 10%. Measured (seed 0, one thread): 53.2 (and), 44.1 (instance),
    # 52.2 (and-oneoff); 30 leaves a wide margin for other machines' rounding, far above chance.
    assert summary["final_knn_top1"] == summary["rounds"][-1]["knn_top1"] > 30.0
    assert isinstance(summary["final_knn_top1_recomputed"], float) and summary["final_knn_top1_recomputed"] > 30.0
    # Every epoch is evaluated (the released recipe), and the best one is labelled as such.
    assert [e["knn_top1"] for e in summary["epochs"]] == [r["knn_top1"] for r in summary["rounds"]]
    best = max(summary["rounds"], key=lambda r: (r["knn_top1"], r["round"]))
    assert summary["best_epoch"] == {"round": best["round"], "epoch": 0, "knn_top1": best["knn_top1"]}
    for png in ("knn_per_round.png", "consistency_per_round.png", "entropy_per_round.png"):
        assert (run / png).stat().st_size > 1000
    from storage import Store

    store = Store.open(str(run / "store"))
    assert store.complete_feature_rounds() == [0, 1, 2]
    assert store.published_rounds() == ([] if method == "instance" else [1, 2])
    from trainer.data import load_dataset

    assert store.read_labels().tolist() == load_dataset("digits").train.labels.tolist()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (ckpt["round"], ckpt["epoch"], ckpt["config"]["method"]) == (3, 0, method)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    # The final memory bank is the last snapshot in the store.
    assert torch.equal(torch.from_numpy(store.feature_reader(2).read_all()), ckpt["memory"])
    if method == "and":
        probe = _cli(["linear-probe", "--run-dir", str(run), "--epochs", "2"])
        assert probe.exit_code == 0, probe.output + probe.stderr
        result = json.loads((run / "linear_probe.json").read_text())
        assert set(result) == {"train_top1", "test_top1", "epochs", "knn_top1_memory", "knn_top1_recomputed",
                               "round", "epoch", "features"}
        # The linear probe on the backbone reached 84.5% test top-1 (measured); chance is 10%.
        assert result["knn_top1_memory"] == summary["final_knn_top1"] and result["test_top1"] > 50.0
        # The run's own final evaluation against recomputed train features (the released code's
        # evaluation of a trained model) is the probe's, which embeds the checkpoint anew.
        assert result["knn_top1_recomputed"] == summary["final_knn_top1_recomputed"]


def test_a_one_process_run_checks_its_config_and_decodes_its_data_once(tmp_path, monkeypatch):
    """trainer run checks everything once (trainer.preflight) and trains on the data it decoded."""
    import trainer.config
    import trainer.data
    import trainer.preflight

    calls = {"validate": 0, "load_dataset": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    validate, load = counted("validate", trainer.config.validate), counted("load_dataset", trainer.data.load_dataset)
    for module in (trainer.config, trainer.preflight):
        monkeypatch.setattr(module, "validate", validate)
    for module in (trainer.data, trainer.preflight):
        monkeypatch.setattr(module, "load_dataset", load)
    result = _cli(["run", "--run-dir", str(tmp_path / "run"), "--rounds", "1", "--epochs-per-round", "1",
                   "--eval-every", "0"])
    assert result.exit_code == 0, result.output + result.stderr
    assert calls == {"validate": 1, "load_dataset": 1}


def test_compile_without_a_cxx_compiler_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))          # no g++ / c++ / clang++ to be found
    monkeypatch.delenv("CXX", raising=False)
    run = tmp_path / "run"
    one_line_error(_cli(["run", "--run-dir", str(run), "--compile"]), "--compile needs a C++ compiler")
    one_line_error(_cli(["speed", "--compile"]), "--compile needs a C++ compiler")
    assert not run.exists()


@pytest.mark.slow
def test_a_compiled_run_trains_like_the_eager_one(tmp_path):
    """--compile runs the same step through inductor's kernels: two epochs' losses and the memory
    bank after them match the eager run up to float rounding, and the checkpoint has the eager
    module's keys."""
    from trainer.loop import train
    from trainer.world import World

    summaries = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        cfg = resolve(TrainConfig(method="instance", rounds=1, epochs_per_round=1, compile=compiled,
                                  run_dir=str(tmp_path / name)))
        summaries[name] = train(cfg, World.single(), log=lambda _: None)
    eager = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)
    compiled = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    assert compiled["model"].keys() == eager["model"].keys()
    assert compiled["config"]["compile"] is True
    losses = [[h["loss"] for h in ckpt["history"]] for ckpt in (eager, compiled)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    # inductor fuses and reorders float sums: rows drift apart slightly, not in direction
    assert float((compiled["memory"] * eager["memory"]).sum(1).min()) > 0.999


def test_a_run_dir_with_a_checkpoint_is_not_reused_without_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"earlier run")
    one_line_error(_cli(["run", "--run-dir", str(run), "--rounds", "1"]), "already holds a run: pass --resume")
    assert not (run / "store").exists()


# ---------------------------------------------------------------- resume after SIGKILL

def _trainer(*args):
    return [sys.executable, "-m", "trainer.cli", "run", *args]


def test_resume_after_sigkill_gives_the_uninterrupted_result(tmp_path):
    args = ["--rounds", "2", "--epochs-per-round", "4", "--seed", "3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_trainer(*args, "--run-dir", str(whole)), env=ENV, check=True, capture_output=True, timeout=300)

    kill_when_checkpointed(_trainer(*args, "--run-dir", str(killed)), killed, ENV)   # inside round 1, after its rebuild
    assert not (killed / "summary.json").exists(), "killed too late: the run had finished"

    subprocess.run(_trainer("--run-dir", str(killed), "--resume"), env=ENV, check=True, capture_output=True, timeout=300)
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert torch.equal(a["memory"], b["memory"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (whole, killed))
    assert [r["knn_top1"] for r in sa["rounds"]] == [r["knn_top1"] for r in sb["rounds"]]
    assert sa["final_knn_top1"] == sb["final_knn_top1"]
    assert [r["consistency"] for r in sa["rounds"]] == [r["consistency"] for r in sb["rounds"]]


# ---------------------------------------------------------------- --index service

def test_service_mode_times_out_with_one_line(tmp_path):
    run = tmp_path / "run"
    result = _cli(["run", "--run-dir", str(run), "--rounds", "1", "--epochs-per-round", "1",
                   "--index", "service", "--index-timeout", "1"])
    one_line_error(result, "timed out after 1s waiting for neighbourhoods/round-1")
    assert "waiting for neighbourhoods/round-1" in result.output          # it said what it waited for


def test_service_mode_with_nbr_index_serve_matches_the_inline_run(tmp_path):
    args = ["--rounds", "2", "--epochs-per-round", "1", "--seed", "4"]
    store = tmp_path / "service" / "store"
    serve = subprocess.Popen([sys.executable, "-m", "nbr_index", "serve", "--store", str(store),
                              "--poll-seconds", "0.1", "--until-round", "2"], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        service = subprocess.run(_trainer(*args, "--run-dir", str(tmp_path / "service"), "--index", "service",
                                          "--index-timeout", "120"), env=ENV, capture_output=True, text=True,
                                 timeout=300)
        assert service.returncode == 0, service.stderr
        assert serve.wait(timeout=60) == 0, serve.stderr.read().decode()
    finally:
        if serve.poll() is None:
            serve.kill()
    inline = subprocess.run(_trainer(*args, "--run-dir", str(tmp_path / "inline")), env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert inline.returncode == 0, inline.stderr
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("service", "inline"))
    assert torch.equal(a["memory"], b["memory"])
    def without_seconds(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert without_seconds(a["rounds"]) == without_seconds(b["rounds"])

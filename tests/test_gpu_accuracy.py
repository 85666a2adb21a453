"""bench/gpu_accuracy.sh and its protocol (bench/accuracy.py cifar10-gpu-short): each method's run
is a `trainer run` whose flags validate as the protocol says, the two runs' budget fits one
9-minute device command at the speed the protocol was sized for, and without a GPU the script stops
with one line. (Its --rehearse, digits on CPU, takes minutes on 2 cores: run by hand, not here.)"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_accuracy.sh"
spec = importlib.util.spec_from_file_location("accuracy_bench_gpu", ROOT / "bench" / "accuracy.py")
accuracy = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = accuracy   # dataclasses look their module up there
spec.loader.exec_module(accuracy)

COMMAND_S = 540            # one device command of at most 9 minutes
CIFAR10_TRAIN = 50_000
SLOWEST_IMAGES_PER_S = 15_000   # the low end assumed for ResNet18 CIFAR, batch 256, bf16, on an H100
OVERHEAD_PER_RUN_S = 80    # start-up, JPEG decoding, per-epoch kNN, checkpoints, the linear probe


@pytest.mark.parametrize("method", ["and", "instance"])
def test_each_short_gpu_run_is_a_trainer_run_of_the_protocol(method, tmp_path):
    from trainer.cli import build_config, run
    from trainer.config import validate

    protocol = accuracy.PROTOCOLS["cifar10-gpu-short"]
    job = accuracy.Run("project", method, 0, str(tmp_path / "run"))
    train, probe = accuracy.commands(job, protocol, str(tmp_path / "cifar10"))
    assert train[1:4] == ["-m", "trainer.cli", "run"] and probe[1:4] == ["-m", "trainer.cli", "linear-probe"]
    context = run.make_context("run", train[4:])
    flags = {k: v for k, v in context.params.items()
             if k not in ("config_file", "resume", "world_size", "max_restarts", "master_port", "check_replicas")}
    cfg = build_config(flags, None, resume=False)
    validate(cfg)
    assert (cfg.method, cfg.arch, cfg.precision, cfg.device) == (method, "resnet18", "bf16", "cuda")
    assert (cfg.rounds + 1, cfg.epochs_per_round, cfg.batch_size) == (5, 10, 256)
    assert (cfg.dataset, cfg.data_root) == ("imagefolder", str(tmp_path / "cifar10"))
    # The paper's protocol stays, for a GPU of one's own: the same run at 50 epochs a round.
    assert accuracy.PROTOCOLS["cifar10-gpu"] == accuracy.dataclasses.replace(protocol, name="cifar10-gpu", epochs=50)


def test_both_short_runs_fit_one_device_command_at_the_speed_it_was_sized_for():
    protocol = accuracy.PROTOCOLS["cifar10-gpu-short"]
    runs_s = int(re.search(r"^RUNS_S=\$\{RUNS_S:-(\d+)\}", SCRIPT.read_text(), flags=re.M).group(1))
    images = (protocol.rounds + 1) * protocol.epochs * CIFAR10_TRAIN
    assert images == 2_500_000
    # AND gets half of RUNS_S; Instance what is left (at least as much).
    assert images / SLOWEST_IMAGES_PER_S + OVERHEAD_PER_RUN_S <= runs_s / 2
    # The GPU probe, wheels and the table take under 40 s; a cut run stops within seconds.
    assert runs_s + 40 <= COMMAND_S


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_without_a_gpu_the_accuracy_command_stops_with_one_error_line(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: no CUDA GPU visible (")
    assert "--rehearse" in result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["accuracy.log"]

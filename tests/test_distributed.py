"""`trainer run --world-size W` as real processes: torch's elastic agent, gloo, the store hand-off
to a separate `nbr-index serve`, restart after a SIGKILLed worker, resume with another W, and
the launch errors."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from storage import Store
from trainer.cli import main
from tests.helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# A short digits run: round 0 (instance) and round 1 (AND, inline or served neighbourhoods).
SHORT = ["--rounds", "1", "--epochs-per-round", "2", "--seed", "7"]


def _trainer(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "run", *args]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_trainer(*args), env=ENV, capture_output=True, text=True, timeout=timeout)


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True, map_location="cpu")


def _worker_pids(launcher_pid: int) -> list[int]:
    """The spawned worker processes of a launcher (its children running the spawn entry point)."""
    pids = []
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            pids.append(int(child))
    return sorted(pids)


def _kill_one_worker_inside_round(proc: subprocess.Popen, run_dir: Path, round_: int) -> None:
    """SIGKILL one worker once the log shows the first epoch of ``round_`` done (mid-round)."""
    log = run_dir / "train.log"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if log.exists() and f"round {round_} epoch 1/" in log.read_text():
            break
        assert proc.poll() is None, "the run ended before a worker could be killed"
        time.sleep(0.02)
    workers = _worker_pids(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)


@pytest.mark.slow
def test_two_ranks_complete_with_identical_replicas_and_a_complete_snapshot(tmp_path):
    run = tmp_path / "run"
    done = _run(*SHORT, "--world-size", "2", "--check-replicas", "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launching 2 worker(s)" in done.stdout and "summary:" in done.stdout

    store = Store.open(str(run / "store"))
    assert store.complete_feature_rounds() == [0, 1] and store.published_rounds() == [1]
    assert store.verify().ok
    bank = _checkpoint(run)["memory"]
    assert torch.equal(torch.from_numpy(store.feature_reader(1).read_all()), bank), "a row was not written"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and [r["round"] for r in summary["rounds"]] == [0, 1]


@pytest.mark.slow
def test_a_separate_nbr_index_serve_and_two_ranks_complete_two_rounds(tmp_path):
    store_dir = tmp_path / "store"
    serve = subprocess.Popen([sys.executable, "-m", "nbr_index", "serve", "--store", str(store_dir),
                              "--wait-for-store", "--poll-seconds", "0.2"],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        done = _run("--rounds", "2", "--epochs-per-round", "1", "--world-size", "2", "--index", "service",
                    "--index-timeout", "120", "--store", str(store_dir), "--run-dir", str(tmp_path / "run"))
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        serve.send_signal(signal.SIGTERM)
        serve_log, _ = serve.communicate(timeout=60)
    assert serve.returncode == 0, serve_log
    store = Store.open(str(store_dir))
    assert store.published_rounds() == [1, 2] and store.complete_feature_rounds() == [0, 1, 2]
    for r in (1, 2):   # served by the index process, consumed by the trainers
        assert store.read_neighbourhoods(r).attrs["source_features_round"] == r - 1
        assert int(store.read_neighbourhoods(r).anchor.sum()) == 1500 * r // 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["anchors"] for r in summary["rounds"]] == [0, 750, 1500]


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path):
    args = ["--rounds", "1", "--epochs-per-round", "6", "--seed", "11", "--world-size", "2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _run(*args, "--run-dir", str(whole)).returncode == 0

    proc = subprocess.Popen(_trainer(*args, "--max-restarts", "1", "--run-dir", str(killed)), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _kill_one_worker_inside_round(proc, killed, round_=1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "restart 1: resuming from the last checkpoint" in output

    a, b = _checkpoint(whole), _checkpoint(killed)
    assert torch.allclose(a["memory"], b["memory"], atol=1e-6)
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6) for k in a["model"])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (whole, killed))
    assert sa["final_knn_top1"] == sb["final_knn_top1"]


@pytest.mark.slow
def test_a_run_saved_by_two_ranks_resumes_with_one(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_trainer("--rounds", "2", "--epochs-per-round", "3", "--world-size", "2",
                                     "--run-dir", str(run)),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _kill_one_worker_inside_round(proc, run, round_=1)      # no restarts: the job fails
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("error: worker rank")
    saved = _checkpoint(run)
    assert saved["world_size"] == 2 and (saved["round"], saved["epoch"]) >= (1, 1)

    resumed = _run("--run-dir", str(run), "--resume", "--world-size", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run} at round {saved['round']} epoch {saved['epoch']}" in resumed.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 1 and [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    store = Store.open(str(run / "store"))
    assert store.complete_feature_rounds() == [0, 1, 2] and store.published_rounds() == [1, 2]
    assert torch.equal(torch.from_numpy(store.feature_reader(2).read_all()), _checkpoint(run)["memory"])


@pytest.mark.parametrize("args, message", [
    (["--world-size", "0"], "--world-size must be at least 1, got 0"),
    (["--world-size", "2000"], "--world-size 2000 is larger than the training set (N = 1500)"),
    (["--world-size", "2", "--device", "cuda"], "no CUDA GPU is available"),
    (["--world-size", "2", "--max-restarts", "-1"], "--max-restarts must be 0 or more"),
])
def test_launch_errors_are_one_line_and_write_nothing(tmp_path, args, message):
    run = tmp_path / "run"
    one_line_error(CliRunner().invoke(main, ["run", "--run-dir", str(run), *args]), message)
    assert not run.exists()


def test_a_rendezvous_port_in_use_is_refused(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["run", "--run-dir", str(tmp_path / "run"), "--world-size", "2",
                                           "--master-port", str(port)])
    one_line_error(result, f"rendezvous port {port} is in use")
    assert not (tmp_path / "run").exists()


def test_a_store_of_another_dataset_is_refused_before_launch(tmp_path):
    store = Store.create_or_open(str(tmp_path / "store"), n=640, dim=128, dataset_id="synthetic-640")
    before = sorted(p.name for p in (tmp_path / "store").rglob("*"))
    result = CliRunner().invoke(main, ["run", "--run-dir", str(tmp_path / "run"), "--world-size", "2",
                                       "--store", store.url])
    one_line_error(result, "was created for n=640, this run has n=1500")
    assert sorted(p.name for p in (tmp_path / "store").rglob("*")) == before


def test_a_store_holding_another_runs_rounds_is_refused_before_launch(tmp_path):
    import numpy as np

    from trainer.data import load_dataset

    dataset_id = load_dataset("digits").dataset_id
    store = Store.create_or_open(str(tmp_path / "store"), n=1500, dim=128, dataset_id=dataset_id)
    store.write_features(0, np.eye(1500, 128, dtype=np.float32))
    before = sorted(p.name for p in (tmp_path / "store").rglob("*"))
    result = CliRunner().invoke(main, ["run", "--run-dir", str(tmp_path / "run"), "--world-size", "2",
                                       "--store", store.url])
    one_line_error(result, "already holds rounds of another run")
    assert sorted(p.name for p in (tmp_path / "store").rglob("*")) == before
    assert not (tmp_path / "run").exists()


def test_the_sync_packing_round_trips_indices_and_features_bit_for_bit():
    from trainer.world import pack_indexed, unpack_indexed

    indices = torch.arange(40, dtype=torch.int64)[1::2] * 123_456_789    # strided, beyond 2**31
    features = torch.randn(20, 7, dtype=torch.float32)
    features[3, 2] = float("-0.0")
    got_indices, got_features = unpack_indexed(pack_indexed(indices, features))
    assert torch.equal(got_indices, indices)
    assert torch.equal(got_features.view(torch.int32), features.view(torch.int32))


@pytest.mark.slow
def test_under_an_outer_torchrun_each_process_runs_as_one_rank(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "trainer.cli", "run", *SHORT, "--check-replicas", "--run-dir", str(run)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launching" not in done.stdout           # no second launcher inside torchrun's workers
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and Store.open(str(run / "store")).complete_feature_rounds() == [0, 1]

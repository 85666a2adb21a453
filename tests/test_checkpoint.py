"""Checkpoints are safe: loading is weights_only, a code-carrying, incomplete or ill-fitting file
is one line with nothing run or written, and a diverged step never reaches a checkpoint."""
from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

from trainer.checkpoint import REQUIRED_KEYS, load_checkpoint, restore, save_checkpoint
from trainer.cli import main
from trainer.errors import TrainerError
from tests.helpers import one_line_error


class RunsACommand:
    """What a hostile checkpoint carries: unpickling it calls os.system."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_code_is_refused_and_runs_nothing(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    run.mkdir()
    torch.save({"format": 1, "config": {}, "x": RunsACommand(str(marker))}, run / "checkpoint.pt")
    before = sorted(os.listdir(run))
    result = CliRunner().invoke(main, ["run", "--run-dir", str(run), "--resume"])
    one_line_error(result, "refusing to load")
    assert not marker.exists()                      # the payload never ran
    assert sorted(os.listdir(run)) == before        # and nothing was written


def test_a_checkpoint_without_its_keys_is_one_line(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "config": {}}, path)
    with pytest.raises(TrainerError, match="lacks round, epoch, model") as err:
        load_checkpoint(str(path))
    assert "\n" not in str(err.value)
    for key in REQUIRED_KEYS:
        assert key in str(err.value) or key == "config"


def _trainer_state(model, optimizer, memory):
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "memory": memory.clone()}


def test_restore_refuses_shapes_that_do_not_fit_and_changes_nothing():
    torch.manual_seed(0)
    small = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)
    state = _trainer_state(small, opt, torch.randn(10, 3))
    # Another bank size: refused before the model is touched.
    other = torch.nn.Linear(4, 3)
    weights = other.weight.detach().clone()
    with pytest.raises(TrainerError, match=r"memory bank of 10 x \(3,\) but this run needs 12 x 3"):
        restore(state, "ckpt", other, torch.optim.SGD(other.parameters(), lr=0.1), torch.zeros(12, 3))
    assert torch.equal(other.weight, weights)
    # Another model shape: one line naming the mismatch.
    wide = torch.nn.Linear(5, 3)
    with pytest.raises(TrainerError, match="does not fit this run's model .*size mismatch") as err:
        restore(state, "ckpt", wide, torch.optim.SGD(wide.parameters(), lr=0.1), torch.zeros(10, 3))
    assert "\n" not in str(err.value)
    # The right shapes restore exactly.
    bank = torch.zeros(10, 3)
    restore(state, "ckpt", other, torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9), bank)
    assert torch.equal(other.weight, small.weight) and torch.equal(bank, state["memory"])


def test_a_resumed_run_with_another_dim_is_one_line(tmp_path):
    run = tmp_path / "run"
    args = ["run", "--run-dir", str(run), "--rounds", "1", "--epochs-per-round", "1"]
    assert CliRunner().invoke(main, args).exit_code == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["memory"] = state["memory"][:, :64].contiguous()
    state["round"] = 1
    save_checkpoint(str(run / "checkpoint.pt"), state)   # an intact checkpoint (its digests recomputed)
    one_line_error(CliRunner().invoke(main, ["run", "--run-dir", str(run), "--resume"]),
                   "holds a memory bank of 1500 x (64,) but this run needs 1500 x 128")


def test_a_diverged_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """Epoch 1 trains at lr 0.03; from epoch 2 the lr is 0.03 x 1e40 and the loss overflows. The
    run stops with one line naming round, epoch and step; the checkpoint stays the one after
    epoch 1, with a finite bank, and no feature snapshot holds the NaN."""
    from storage import Store

    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--run-dir", str(run), "--rounds", "1", "--epochs-per-round", "2",
                                       "--lr-milestones", "0.5", "--lr-gamma", "1e40"])
    one_line_error(result, "round 0 epoch 2 step ")
    assert "the loss is not finite" in result.stderr
    state = load_checkpoint(str(run / "checkpoint.pt"))
    assert (state["round"], state["epoch"]) == (0, 1)
    assert torch.isfinite(state["memory"]).all()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert Store.open(str(run / "store")).complete_feature_rounds() == []


def test_a_run_state_round_trips_through_its_checkpoint(tmp_path):
    """RunState.save then load_state_dict into a fresh run gives back every tensor, position,
    row and the torch RNG stream, and what it writes is a complete checkpoint."""
    from types import SimpleNamespace

    from trainer.config import TrainConfig
    from trainer.run_state import RunState

    def fresh(seed: int) -> RunState:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        return RunState(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), torch.randn(10, 3))

    state = fresh(0)
    state.model(torch.randn(5, 4)).sum().backward()
    state.optimizer.step()                                  # momentum buffers and BN statistics exist
    state.start_round(2)
    state.epoch_done({"round": 2, "epoch": 0, "loss": 1.5})
    state.epoch_done({"round": 2, "epoch": 1, "loss": 1.25})
    state.rounds = [{"round": 0, "knn_top1": 40.0}, {"round": 1, "knn_top1": 45.0}]
    cfg = TrainConfig(run_dir=str(tmp_path))
    data = SimpleNamespace(image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, classes=["a", "b"], dataset_id="t")
    state.save(cfg, world_size=2, data=data)
    expected_next = torch.rand(3)                           # the stream right after the save

    saved = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert set(REQUIRED_KEYS) <= set(saved) and saved["world_size"] == 2 and saved["data"]["image_size"] == 8
    other = fresh(1)
    other.load_state_dict(saved, "ckpt")
    assert torch.equal(torch.rand(3), expected_next)
    assert (other.round, other.epoch) == (2, 2) and other.history == state.history and other.rounds == state.rounds
    assert other.round_seconds == pytest.approx(state.round_seconds)
    assert torch.equal(other.memory, state.memory)
    for (name, a), b in zip(state.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), name
    momentum = [state.optimizer.state[p]["momentum_buffer"] for p in state.model.parameters()]
    assert all(torch.equal(a, other.optimizer.state[q]["momentum_buffer"])
               for a, q in zip(momentum, other.model.parameters()))
    # Resumed in the round it was saved in, the round's clock continues; a new round starts at 0.
    other.start_round(2)
    assert other.seconds_in_round() >= state.round_seconds
    other.round_done({"round": 2, "knn_top1": 50.0})
    assert (other.round, other.epoch, other.round_seconds) == (3, 0, 0.0)

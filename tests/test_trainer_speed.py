"""`trainer speed` measures under the determinism setting `trainer run` trains with: deterministic
by default (TrainConfig.deterministic), off with --no-deterministic, and the process's setting is
left as it was."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from trainer import speed
from trainer.cli import main
from trainer.config import TrainConfig


@pytest.mark.parametrize("flags, expected", [([], TrainConfig().deterministic), (["--deterministic"], True),
                                             (["--no-deterministic"], False)])
def test_speed_measures_under_the_runs_determinism_setting(monkeypatch, flags, expected):
    seen = []
    measure = speed._measure

    def measure_and_record(*args):   # the real measurement, with the setting it ran under noted
        seen.append(torch.are_deterministic_algorithms_enabled())
        return measure(*args)

    monkeypatch.setattr(speed, "_measure", measure_and_record)
    before = torch.are_deterministic_algorithms_enabled()
    result = CliRunner().invoke(main, ["speed", "--size", "8", "--n", "64", "--batch-size", "4", "--steps", "1",
                                       *flags])
    assert result.exit_code == 0, result.output
    assert seen == [expected]
    words = "deterministic" if expected else "non-deterministic"
    assert f" fp32 {words} cpu" in result.output and "AND / supervised = " in result.output
    assert torch.are_deterministic_algorithms_enabled() == before

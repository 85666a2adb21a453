"""Helpers shared by the test files: `from tests.helpers import ...`."""

from __future__ import annotations

import signal
import subprocess
import time

import numpy as np


def unit_rows(n, dim, seed=0):
    """(n, dim) float32 rows, uniform on the unit sphere, seeded."""
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class ArrayReader:
    """A storage.FeatureReader stand-in over an in-memory array that records which row ranges
    were read."""

    def __init__(self, rows, chunk_rows):
        self.rows, self.n, self.dim, self.chunk_rows = rows, rows.shape[0], rows.shape[1], chunk_rows
        self.reads = []

    def read(self, start, stop):
        self.reads.append((start, stop))
        return self.rows[start:stop].copy()


def one_line_error(result, message):
    """A click CliRunner result of bad input: exit status 2, and on stderr exactly one line,
    ``error: ...`` containing ``message``, with no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def wait_for(condition, timeout=60.0, what="condition"):
    """Poll ``condition()`` every 50 ms until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_position(path):
    """(round, epoch) a run's checkpoint.pt resumes at; None while it is absent or being replaced."""
    import torch

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:   # not there yet, or replaced while read
        return None
    return state["round"], state["epoch"]


def kill_when_checkpointed(command, run_dir, env, position=(1, 1), timeout=240.0):
    """Start ``command`` (a ``trainer run`` writing ``run_dir``, a pathlib.Path) and SIGKILL it
    as soon as its checkpoint has reached ``position`` (round, epoch): inside that round, after
    its rebuild. Fails if the run ends first."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reached = checkpoint_position(run_dir / "checkpoint.pt")
        if reached is not None and reached >= position:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

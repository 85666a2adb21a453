"""bench/gpu_check.sh: its rehearsal on CPU (the same steps, logic, summary and files as on a GPU,
at toy sizes), its one-line stop where no GPU is visible, a tests step that fails when every test
skips, and the real mode's step budgets, which must fit 360 s."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEP_LOGS = {"gpu.log", "setup.log", "rebuild.log", "cuda-tests.log", "speed-bf16.log", "speed-bf16-compiled.log"}
MAX_FILES_BACK = 8   # what a device command returns from $OUT


def _start(out_dir: Path, *args: str, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.Popen(["bash", str(SCRIPT), *args, str(out_dir)], cwd=ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def rehearsals(tmp_path_factory):
    """Two rehearsals run side by side: the plain one, and one whose tests step gets only
    tests that skip without a GPU. {name: (exit code, stdout, stderr, out dir)}."""
    base = tmp_path_factory.mktemp("gpu-check")
    started = {"plain": _start(base / "plain", "--rehearse"),
               "all-skipped": _start(base / "all-skipped", "--rehearse", GPU_CHECK_TESTS="tests/test_trainer_cuda.py")}
    results = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = (process.returncode, stdout, stderr, base / name)
    return results


def _summary(out_dir: Path) -> list[str]:
    return (out_dir / "summary.txt").read_text().splitlines()


def _line(lines: list[str], prefix: str) -> str:
    found = [line for line in lines if line.startswith(prefix)]
    assert len(found) == 1, f"one line starting {prefix!r} expected in:\n" + "\n".join(lines)
    return found[0]


def _check_target_line(line: str, op: str, limit: float) -> None:
    """A target line's PASS or FAIL word agrees with its own number."""
    match = re.fullmatch(rf"  .*: ([0-9.]+) {re.escape(op)} {limit}: (PASS|FAIL)", line)
    assert match, line
    value = float(match.group(1))
    assert match.group(2) == ("PASS" if (value <= limit if op == "<=" else value >= limit) else "FAIL"), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal's CPU sizes are for a machine without a GPU")
def test_the_rehearsal_runs_every_step_and_writes_the_summary_and_logs(rehearsals):
    code, stdout, stderr, out_dir = rehearsals["plain"]
    assert code == 0, stdout + stderr
    files = {p.name for p in out_dir.iterdir()}
    assert files == STEP_LOGS | {"summary.txt"} and len(files) <= MAX_FILES_BACK
    lines = _summary(out_dir)
    assert stdout.splitlines() == lines    # what the device command prints is the summary
    assert lines[0].startswith("gpu-check rehearsal on CPU at toy sizes")
    assert _line(lines, "gpu: ").endswith("(rehearsal: no GPU looked for)")
    assert re.fullmatch(r"step setup: ok in \d+ s \(budget \d+ s\): zarr \S+ faiss \S+", _line(lines, "step setup:"))
    rebuild = re.fullmatch(r"step rebuild: ok in \d+ s \(budget \d+ s\): \(c\)/\(e\) = ([0-9.]+)",
                           _line(lines, "step rebuild:"))
    assert rebuild, lines
    assert any(line.strip().startswith("ratios:") and f"fused_over_full_matmul {rebuild.group(1)}" in line
               for line in lines)
    assert re.fullmatch(r"step cuda-tests: ok in \d+ s \(budget \d+ s\): 1 passed, 0 failed, 0 skipped",
                        _line(lines, "step cuda-tests:"))
    assert "deterministic cpu" in _line(lines, "step speed-bf16:")
    assert re.fullmatch(r"step speed-bf16-compiled: skipped: \d+ s of the \d+ s left, under the \d+ s it needs",
                        _line(lines, "step speed-bf16-compiled:"))
    targets = lines[lines.index("targets:") + 1:-1]
    assert len(targets) == 3
    _check_target_line(targets[0], "<=", 1.6)
    _check_target_line(targets[1], ">=", 0.85)
    assert targets[2] == "  AND / supervised, smallcnn bf16 compiled: not measured"
    met = sum(t.endswith(": PASS") for t in targets)
    assert re.fullmatch(rf"result: all steps ok; targets {met} PASS, {2 - met} FAIL; \d+ s of \d+ s; logs in .*",
                        lines[-1])
    assert (out_dir / "speed-bf16-compiled.log").read_text().startswith("skipped:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine these tests run rather than skip")
def test_a_tests_step_where_every_test_skips_fails_the_check(rehearsals):
    code, stdout, _, out_dir = rehearsals["all-skipped"]
    assert code == 1, stdout
    lines = _summary(out_dir)
    tests_line = _line(lines, "step cuda-tests:")
    assert re.fullmatch(r"step cuda-tests: FAIL \(exit 0\) in \d+ s \(budget \d+ s\): 0 passed, 0 failed, "
                        r"(\d+) skipped: no test ran: every test must run here \(SKIPPED .*needs a CUDA GPU\)",
                        tests_line), tests_line
    assert lines[-1].startswith("result: 1 step(s) failed: cuda-tests;")
    # The other steps ran as ever.
    assert _line(lines, "step rebuild:").startswith("step rebuild: ok")
    assert _line(lines, "step speed-bf16:").startswith("step speed-bf16: ok")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_without_a_gpu_the_check_stops_with_one_error_line(tmp_path):
    process = _start(tmp_path / "out")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert stdout == ""
    assert len(stderr.splitlines()) == 1
    assert stderr.startswith("error: no CUDA GPU visible (torch ") and "is_available() is False" in stderr
    assert "--rehearse" in stderr
    # Nothing else ran: only the probe's log and the summary holding the error.
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"gpu.log", "summary.txt"}
    assert (tmp_path / "out" / "summary.txt").read_text() == stderr


def _budgets(text: str) -> dict[str, int]:
    """The real mode's budget assignments: lines NAME_S=<int> at the start of a line."""
    return {name: int(value) for name, value in re.findall(r"^([A-Z_]+_S)=(\d+)\b", text, flags=re.M)}


def test_the_real_step_budgets_add_up_to_at_most_360_s():
    text = SCRIPT.read_text()
    budgets = _budgets(text)
    fixed = ["GPU_S", "SETUP_S", "REBUILD_S", "TESTS_S", "SPEED_S"]
    assert set(budgets) == {"TOTAL_S", "COMPILED_MIN_S", *fixed}
    # The compiled step runs only when COMPILED_MIN_S are left and gets what is left of TOTAL_S.
    assert sum(budgets[name] for name in fixed) + budgets["COMPILED_MIN_S"] <= budgets["TOTAL_S"] <= 360
    # Every step runs under one of these budgets, none under a number of its own, in the order
    # that puts what matters most first.
    steps = re.findall(r'^ *step (\S+) "\$(\w+)"', text, flags=re.M)
    assert steps == [("gpu", "GPU_S"), ("setup", "SETUP_S"), ("rebuild", "REBUILD_S"), ("cuda-tests", "TESTS_S"),
                     ("speed-bf16", "SPEED_S"), ("speed-bf16-compiled", "left")]
    assert re.search(r'^left=\$\(\(TOTAL_S - \(SECONDS - started\)\)\)$', text, flags=re.M)
    assert re.search(r'^if \[ "\$left" -ge "\$COMPILED_MIN_S" \]', text, flags=re.M)

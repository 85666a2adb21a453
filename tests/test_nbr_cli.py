"""The nbr-index command line: summaries, JSON, inspect, and one-line errors with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nbr_index.cli import main
from storage import Store
from tests.helpers import unit_rows

N, DIM = 300, 8
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    store = Store.create_or_open(str(tmp_path / "store"), n=N, dim=DIM, dataset_id="cli",
                                 curriculum={"rounds": 4, "k": 1, "tau": 0.1, "mode": "progressive"}, chunk_rows=64)
    store.write_features(0, unit_rows(N, DIM))
    return store


def run(*arguments):
    return CliRunner().invoke(main, [str(a) for a in arguments])


def test_rebuild_prints_a_one_line_summary_then_reports_it_already_published(store):
    result = run("rebuild", "--store", store.url, "--round", 1, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().startswith("round 1 published: 75 anchors of 300, k=1, tau=0.1")
    assert "backend torch on cpu" in result.stdout and len(result.stdout.strip().splitlines()) == 1
    again = run("rebuild", "--store", store.url, "--round", 1, "--json")
    line = json.loads(again.stdout)
    assert line["published"] is False and line["anchors"] == 75 and line["backend"] == "torch"


def test_inspect_describes_and_verifies_the_store(store):
    run("rebuild", "--store", store.url, "--round", 1, "--quiet")
    text = run("inspect", "--store", store.url, "--verify")
    assert text.exit_code == 0 and "verify: ok" in text.stdout and "round   1" in text.stdout
    described = json.loads(run("inspect", "--store", store.url, "--json").stdout)
    assert described["n"] == N and [entry["round"] for entry in described["neighbourhoods"]] == [1]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--round", 2], "neighbourhood round 2 waits for features round 1"),
        (["--round", 0], "round must be in 1..4"),
        (["--round", 5], "round must be in 1..4"),
        (["--round", 1, "--rounds", 0], "rounds (R) must be an integer >= 1"),
        (["--round", 1, "--k", N], "k must satisfy 1 <= k < N = 300"),
        (["--round", 1, "--device", "cuda"], "no CUDA GPU is available"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_publish_nothing(store, arguments, message):
    result = run("rebuild", "--store", store.url, "--quiet", *arguments)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert Store.open(store.url).published_rounds() == []


def test_nan_features_are_named_and_nothing_is_published(store):
    rows = unit_rows(N, DIM)
    rows[123, 4] = np.inf
    store.write_features(1, rows)
    result = run("rebuild", "--store", store.url, "--round", 2, "--quiet")
    assert result.exit_code == 2 and result.stderr == "error: feature row 123 contains NaN or Inf; " \
        "the memory bank is corrupted (re-run the training round that wrote it)\n"
    assert store.published_rounds() == []


def test_missing_store_exits_2_in_a_real_process(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "nbr_index", "rebuild", "--store", str(tmp_path / "nowhere"), "--round", "1"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith("error: no store at") and completed.stderr.count("\n") == 1
    assert "Traceback" not in completed.stderr


def test_faiss_backend_without_faiss_installed(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    result = run("rebuild", "--store", store.url, "--round", 1, "--backend", "faiss")
    assert result.exit_code == 2 and "pip install faiss-cpu" in result.stderr
    assert store.published_rounds() == []


def test_help_explains_the_commands():
    result = run("--help")
    for command in ("rebuild", "serve", "inspect", "bench"):
        assert command in result.stdout
    assert "--until-round" in run("serve", "--help").stdout


def test_bench_runs_every_stage_and_checks_the_result():
    result = run("bench", "--n", 600, "--dim", 16, "--json")
    report = json.loads(result.stdout)
    assert set(report["seconds"]) == {"faiss_knn", "fused", "matmul_only", "matmul_full", "unfused_reference"}
    assert report["check_vs_reference"]["top1_agreement"] == 1.0
    assert report["check_vs_reference"]["max_entropy_rel_error"] < 1e-5
    assert {"fused_over_faiss", "fused_over_reference", "fused_over_matmul", "fused_over_full_matmul"} <= set(report["ratios"])


def test_memory_bench_measures_a_chunked_pass_from_a_store(tmp_path):
    result = run("bench", "--mode", "memory", "--n", 3000, "--dim", 16, "--store-dir", tmp_path, "--json")
    report = json.loads(result.stdout)
    assert report["completed"] and report["n"] == 3000 and report["feature_bytes"] == 3000 * 16 * 4
    assert 0 < report["peak_above_before_bytes"] < 1 << 30


def test_without_faiss_the_default_backend_rebuilds_and_a_faiss_backend_names_the_extra(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError, as without the extra
    refused = run("rebuild", "--store", store.url, "--round", 1, "--backend", "faiss", "--quiet")
    assert refused.exit_code == 2 and "pip install 'and-nbr[cpu]'" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and store.published_rounds() == []
    result = run("rebuild", "--store", store.url, "--round", 1, "--quiet")
    assert result.exit_code == 0, result.output
    assert "backend torch on cpu" in result.stdout and store.published_rounds() == [1]

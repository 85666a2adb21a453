"""The real CIFAR-10 JPEGs of ../shared/data through the `imagefolder` dataset and a short run.

Skipped, with the reason, where ../shared (the project's shared data folder) is absent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
PER_CLASS = {"train": 40, "test": 10}

pytestmark = pytest.mark.skipif(not TARBALL.exists(),
                                reason=f"the shared CIFAR-10 JPEGs are not here ({TARBALL} is absent)")


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory) -> Path:
    """The first PER_CLASS[split] JPEGs of every class, unpacked in the ImageFolder layout."""
    root = tmp_path_factory.mktemp("cifar10")
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(TARBALL, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in PER_CLASS:
                continue
            key = (parts[0], parts[1])
            if taken.get(key, 0) < PER_CLASS[parts[0]]:
                taken[key] = taken.get(key, 0) + 1
                tar.extract(member, root, filter="data")
    return root


def test_imagefolder_reads_the_real_jpegs(cifar_subset):
    from trainer.data import load_dataset

    data = load_dataset("imagefolder", str(cifar_subset), False, None, True, 0)
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"]
    assert (len(data.train), len(data.test), data.image_size) == (400, 100, 32)
    assert sorted(data.train.labels.tolist()) == sorted(list(range(10)) * 40)


def test_a_short_and_run_on_the_real_jpegs(cifar_subset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "trainer.cli", "run", "--dataset", "imagefolder", "--data-root",
                    str(cifar_subset), "--rounds", "1", "--epochs-per-round", "1", "--batch-size", "64",
                    "--knn-k", "50", "--run-dir", str(run_dir)], env=env, check=True, capture_output=True, timeout=300)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["anchors"] for r in summary["rounds"]] == [0, 400]
    assert summary["dataset"]["n_train"] == 400 and summary["final_knn_top1"] is not None

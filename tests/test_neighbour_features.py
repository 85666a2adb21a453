"""``--neighbour-features backbone``: the trainer publishes its backbone's features of the
un-augmented training images as features/round-r, the index finds neighbourhoods in them and
records which features it used. Checked against the trained model's own embedding, a float64
brute force, and the bank runs they must leave unchanged."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nbr_index.reference import brute_force_knn_entropy
from storage import Store
from tests.helpers import one_line_error
from trainer.cli import main
from trainer.data import load_dataset
from trainer.embedding import embed, load_model

HEAD_DIM = 32   # not the smallcnn backbone's F = 128, so the store's width tells which was published


def _run(run_dir, *flags):
    result = CliRunner().invoke(main, ["run", "--run-dir", str(run_dir), "--rounds", "2", "--epochs-per-round", "1",
                                       "--eval-every", "0", "--dim", str(HEAD_DIM), *flags])
    assert result.exit_code == 0, result.output + result.stderr
    return Store.open(str(run_dir / "store"))


def test_a_backbone_run_publishes_the_trained_backbones_features_and_finds_neighbours_in_them(tmp_path):
    run = tmp_path / "run"
    store = _run(run, "--neighbour-features", "backbone")
    assert store.info.dim == 128 and store.info.curriculum["neighbour_features"] == "backbone"

    # The last round's snapshot is the final network's backbone on the plain training images.
    model = load_model(str(run))
    train = load_dataset("digits").train
    expected = torch.nn.functional.normalize(embed(model, train.images, head=False), dim=1).numpy()
    published = store.feature_reader(2).read_all()
    assert published.shape == (len(train), 128)
    np.testing.assert_allclose(published, expected, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(published, axis=1), 1.0, atol=1e-5)

    # Each round's neighbourhoods are the exact k-NN and entropy of the previous round's snapshot.
    for r in (1, 2):
        round_r = store.read_neighbourhoods(r)
        assert round_r.attrs["neighbour_features"] == "backbone"
        neighbours, _, entropy = brute_force_knn_entropy(store.feature_reader(r - 1).read_all(), 1, 0.1)
        assert (np.asarray(round_r.neighbours) == neighbours).mean() > 0.999   # float32 pass vs float64
        np.testing.assert_allclose(np.asarray(round_r.entropy), entropy, rtol=1e-4)
    summary = json.loads((run / "summary.json").read_text())
    assert [r["anchors"] for r in summary["rounds"]] == [0, 750, 1500]
    assert summary["config"]["neighbour_features"] == "backbone"


def test_a_bank_run_publishes_the_bank_and_records_no_new_curriculum_key(tmp_path):
    store = _run(tmp_path / "run")
    # Absent means the bank: stores of runs made before the option still match their resumed runs.
    assert store.info.dim == HEAD_DIM and "neighbour_features" not in store.info.curriculum
    assert store.read_neighbourhoods(1).attrs["neighbour_features"] == "bank"


def test_a_backbone_run_resumes_into_its_store_and_a_bank_run_cannot_take_it(tmp_path):
    run = tmp_path / "run"
    _run(run, "--neighbour-features", "backbone")
    other = CliRunner().invoke(main, ["run", "--run-dir", str(tmp_path / "other"), "--store", str(run / "store"),
                                      "--dim", str(HEAD_DIM)])
    one_line_error(other, "was created for dim=128, this run has dim=32")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("value", ["pixels", "memory"])
def test_an_unknown_kind_of_neighbour_features_is_one_line(tmp_path, value):
    bad = CliRunner().invoke(main, ["run", "--run-dir", str(tmp_path / "bad"), "--neighbour-features", value])
    one_line_error(bad, f"unknown neighbour features {value!r}: choose one of bank, backbone")
    assert not (tmp_path / "bad").exists()

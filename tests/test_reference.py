"""The minimal reference (bench/reference_and.py) against the project, piece by piece.

The reference is written from the paper and the authors' released code, independently of the
project; wherever both compute the same quantity on the same inputs they must agree to float
rounding: the loss (the authors' softmax-then-log form against the project's log-softmax form),
the anchor selection, the kNN vote and the schedule. The whole-run comparison is the accuracy
benchmark (bench/accuracy.py), not a test.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.config import TrainConfig
from trainer.data import load_dataset
from trainer.knn import knn_predict
from trainer.loss import and_loss
from trainer.schedule import lr_at

ROOT = Path(__file__).resolve().parents[1]
TAU = 0.1


def _load_reference():
    spec = importlib.util.spec_from_file_location("reference_and", ROOT / "bench" / "reference_and.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference()


def _unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def test_the_reference_imports_nothing_from_the_project():
    source = (ROOT / "bench" / "reference_and.py").read_text()
    for package in ("trainer", "nbr_index", "storage"):
        assert f"from {package}" not in source and f"import {package}" not in source


@pytest.mark.parametrize("k", [1, 3])
def test_reference_and_project_give_the_same_loss_and_gradient_on_the_same_batch(k):
    n, d, b = 300, 16, 40
    memory = _unit(n, d, 0)
    base = _unit(b, d, 1)
    indices = torch.randperm(n, generator=torch.Generator().manual_seed(2))[:b]
    # Anchors: every third sample, their k neighbours anything but themselves.
    anchor = torch.zeros(n, dtype=torch.bool)
    anchor[::3] = True
    anchor_ids = torch.nonzero(anchor).flatten()
    g = torch.Generator().manual_seed(3)
    neighbours = torch.zeros(n, k, dtype=torch.long)
    for i in anchor_ids.tolist():
        neighbours[i] = torch.tensor([j for j in torch.randperm(n, generator=g).tolist() if j != i][:k])
    # The reference's layout: position (N,) into a (A, k) neighbour table.
    position = torch.full((n,), -1, dtype=torch.long)
    position[anchor_ids] = torch.arange(len(anchor_ids))

    ours_x = base.clone().requires_grad_(True)
    theirs_x = base.clone().requires_grad_(True)
    ours = and_loss(ours_x, memory, indices, anchor, neighbours, TAU)
    theirs = ref.criterion(theirs_x @ memory.t() / TAU, indices, position, neighbours[anchor_ids])
    ours.backward()
    theirs.backward()
    assert (anchor[indices].sum() > 0) and (~anchor[indices]).sum() > 0
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=1e-10, atol=1e-12)


def test_reference_and_project_instance_loss_agree_in_float32():
    n, d, b = 2000, 128, 128
    memory, features = _unit(n, d, 4, torch.float32), _unit(b, d, 5, torch.float32)
    indices = torch.arange(b) * 7
    ours = and_loss(features, memory, indices, None, None, TAU)
    theirs = ref.criterion(features @ memory.t() / TAU, indices, torch.full((n,), -1), torch.empty(0, 1).long())
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_reference_anchor_discovery_equals_the_projects_rebuild(tmp_path):
    """The authors' ANsDiscovery, as the reference writes it, against nbr_index's fused pass
    through a real store: the same lowest-entropy anchors and the same neighbours."""
    from nbr_index import rebuild
    from storage import Store

    n, d, rounds = 600, 32, 4
    bank = _unit(n, d, 6, torch.float32)
    store = Store.create_or_open(str(tmp_path / "store"), n=n, dim=d, dataset_id="t",
                                 curriculum={"rounds": rounds, "k": 2, "tau": TAU, "mode": "progressive"})
    store.write_features(1, bank.numpy())
    rebuild(store, 2, rounds=rounds, k=2, tau=TAU, mode="progressive", backend="torch")
    published = store.read_neighbourhoods(2)
    count = n * 2 // rounds
    position, neighbours, anchors = ref.discover_anchors(bank, count, 2, TAU)
    ours_anchor = np.asarray(published.anchor, dtype=bool)
    assert ours_anchor.sum() == count
    assert set(np.flatnonzero(ours_anchor).tolist()) == set(anchors.tolist())
    np.testing.assert_array_equal(np.asarray(published.neighbours)[anchors.numpy()], neighbours.numpy())


def test_reference_knn_vote_equals_the_projects():
    n, q, d, classes = 500, 64, 24, 7
    bank, queries = _unit(n, d, 7, torch.float32), _unit(q, d, 8, torch.float32)
    labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(9))
    test_labels = torch.randint(0, classes, (q,), generator=torch.Generator().manual_seed(10))

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    loader = [(queries[:40], test_labels[:40], None), (queries[40:], test_labels[40:], None)]
    theirs = ref.knn_top1(Identity(), bank, labels, loader, classes, k=50, sigma=0.1)
    ours = knn_predict(queries, bank, labels, classes, k=50, sigma=0.1)
    assert theirs == pytest.approx(100.0 * float((ours == test_labels).float().mean()), abs=1e-9)


def test_reference_embed_gives_every_row_in_order_in_eval_mode_and_restores_training():
    # The recomputed-feature kNN of a trained model embeds the train set with the net in eval
    # mode (batch norm on its running statistics), then puts the net back into training mode.
    net = ref.SmallCNN(dim=16, width=4)
    with torch.no_grad():   # running statistics away from the init, so train and eval mode differ
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    images = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    loader = [(images[:4], None, None), (images[4:], None, None)]
    features = ref.embed(net, loader)
    assert net.training
    net.eval()
    with torch.no_grad():
        expected = net(images)
        train_mode = net.train()(images)
    assert features.shape == (10, 16)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(features, train_mode, atol=1e-3)


def test_reference_schedule_is_the_projects_default_schedule():
    cfg = TrainConfig()
    for epochs in (10, 30, 200):
        assert [ref.step_lr(e, epochs) for e in range(epochs)] == pytest.approx(
            [lr_at(e, epochs, cfg.lr, cfg.lr_milestones, cfg.lr_gamma) for e in range(epochs)], rel=1e-12)


def test_flip_is_off_by_default_as_released():
    from trainer.augment import AugmentSpec, draw_params
    from trainer.seeding import generator

    assert TrainConfig().hflip is False
    data = load_dataset("digits")
    assert data.hflip is False and data.augment_spec.hflip is False
    params = draw_params(512, 8, 8, AugmentSpec(size=8, mean=(0.5,) * 3, std=(0.5,) * 3), generator(0))
    assert not params.flip.any()
    flipped = draw_params(512, 8, 8, AugmentSpec(size=8, mean=(0.5,) * 3, std=(0.5,) * 3, hflip=True), generator(0))
    assert 200 < int(flipped.flip.sum()) < 312


def test_reference_digits_split_and_pixels_are_the_projects():
    train_images, train_labels, test_images, test_labels = ref.load_pil("digits")
    data = load_dataset("digits")
    assert train_labels == data.train.labels.tolist() and test_labels == data.test.labels.tolist()
    ours = data.train.images.permute(0, 2, 3, 1).numpy()
    theirs = np.stack([np.asarray(img) for img in train_images])
    np.testing.assert_array_equal(ours, theirs)

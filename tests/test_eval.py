"""Evaluation: the weighted kNN classifier on hand-built data, the linear probe, and the
guarantee that evaluating changes neither the model nor the memory bank."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import TrainConfig
from trainer.data import load_dataset
from trainer.knn import embed, evaluating, knn_class_scores, knn_predict
from trainer.linear_probe import train_linear_probe
from trainer.evaluation import evaluate_knn
from trainer.memory import init_memory
from trainer.models import build_model
from trainer.world import World


def _at(degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


BANK = _at([0.0, 10.0, 20.0, 90.0, 100.0])
LABELS = torch.tensor([0, 0, 1, 1, 1])


def test_knn_scores_are_summed_exp_weights_of_the_top_k():
    query = _at([40.0])                       # top-3: rows 2 (cos 20), 1 (cos 30), 0 (cos 40)
    c = [math.cos(math.radians(a)) for a in (20, 30, 40)]
    for sigma in (0.1, 1.0):
        scores = knn_class_scores(query, BANK, LABELS, num_classes=3, k=3, sigma=sigma)
        want = torch.tensor([[math.exp(c[1] / sigma) + math.exp(c[2] / sigma), math.exp(c[0] / sigma), 0.0]],
                            dtype=torch.float64)
        torch.testing.assert_close(scores, want)
    # A sharp sigma lets the single closest neighbour win, a flat one the majority.
    assert knn_predict(query, BANK, LABELS, 3, k=3, sigma=0.1).tolist() == [1]
    assert knn_predict(query, BANK, LABELS, 3, k=3, sigma=1.0).tolist() == [0]


def test_knn_predictions_and_tie_rule():
    queries = _at([0.0, 95.0, 45.0])
    # 0 deg: rows 0, 1 (class 0); 95 deg: rows 3, 4 (class 1); 45 deg: rows 2 (cos 25, class 1) and
    # 1 (cos 35, class 0), the closer one outweighs at sigma 0.1 -> class 1
    assert knn_predict(queries, BANK, LABELS, 2, k=2, sigma=0.1).tolist() == [0, 1, 1]
    # Two classes at exactly the same similarity: the lower class index wins.
    tie_bank = _at([30.0, -30.0])
    assert knn_predict(_at([0.0]), tie_bank, torch.tensor([1, 0]), 2, k=2, sigma=0.1).tolist() == [0]


def test_chunked_knn_equals_one_block():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(300, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (300,), generator=g)
    queries = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    whole = knn_predict(queries, bank, labels, 5, k=20, sigma=0.1, budget=10 ** 9)
    chunked = knn_predict(queries, bank, labels, 5, k=20, sigma=0.1, budget=300 * 7)   # 7 queries at a time
    assert torch.equal(whole, chunked)


def test_knn_refuses_k_larger_than_the_bank():
    with pytest.raises(ValueError, match="k=9"):
        knn_predict(_at([0.0]), BANK, LABELS, 2, k=9)


def _model_and_bank(dataset):
    torch.manual_seed(0)
    model = build_model("smallcnn", dataset.image_size)
    memory = init_memory(len(dataset.train), 128, torch.Generator().manual_seed(1))
    # Give BatchNorm some non-default running stats, then compare everything after evaluation.
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, dataset.image_size, dataset.image_size))
    return model, memory


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("start_in_train_mode", [True, False])
def test_evaluation_changes_neither_model_nor_memory_bank(recompute, start_in_train_mode):
    data = load_dataset("synthetic")
    model, memory = _model_and_bank(data)
    model.train(start_in_train_mode)
    state = copy.deepcopy(model.state_dict())
    bank = memory.clone()
    cfg = TrainConfig(dataset="synthetic", knn_k=20, eval_recompute=recompute)
    evaluate_knn(model, memory, data, cfg, World.single("cpu"))
    assert model.training is start_in_train_mode
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert torch.equal(memory, bank)
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_knn_is_the_weighted_knn_of_unaugmented_test_features():
    data = load_dataset("synthetic")
    model, memory = _model_and_bank(data)
    cfg = TrainConfig(dataset="synthetic", knn_k=20, knn_sigma=0.1)
    acc = evaluate_knn(model, memory, data, cfg, World.single("cpu"))
    with evaluating(model):
        test = model(data.eval_batches("test", 1000).__next__()[0])
        train = model(data.eval_batches("train", 1000).__next__()[0])
    pred = knn_predict(test, memory, data.train.labels, 10, k=20, sigma=0.1)
    assert acc == round(100.0 * (pred == data.test.labels).float().mean().item(), 2)
    pred = knn_predict(test, train, data.train.labels, 10, k=20, sigma=0.1)
    recomputed = round(100.0 * (pred == data.test.labels).float().mean().item(), 2)
    # recompute=True (the end of a run) overrides the config; recompute=False keeps the bank.
    assert evaluate_knn(model, memory, data, cfg, World.single("cpu"), recompute=True) == recomputed
    cfg.eval_recompute = True
    assert evaluate_knn(model, memory, data, cfg, World.single("cpu")) == recomputed
    assert evaluate_knn(model, memory, data, cfg, World.single("cpu"), recompute=False) == acc


def test_embed_restores_train_mode_and_keeps_order():
    data = load_dataset("synthetic")
    model, _ = _model_and_bank(data)
    feats, labels = embed(model, data.eval_batches("test", 7), torch.device("cpu"))
    assert model.training
    assert feats.shape == (100, 128) and torch.equal(labels, data.test.labels)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(100))


def test_linear_probe_separates_separable_classes_exactly():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 6) * 10
    y = torch.arange(90) % 3
    x = centres[y] + torch.randn(90, 6, generator=g)
    yt = torch.arange(30) % 3
    xt = centres[yt] + torch.randn(30, 6, generator=g)
    result = train_linear_probe(x, y, xt, yt, 3, epochs=20, batch_size=32)
    assert result == {"train_top1": 100.0, "test_top1": 100.0, "epochs": 20}
    again = train_linear_probe(x, y, xt, yt, 3, epochs=20, batch_size=32)
    assert again == result

"""Linear probe: a linear classifier trained on frozen backbone features (labels used here only).

The features are the backbone's pooled output (``model.embed``, before the 128-d head),
computed once without augmentation, standardised with the training set's statistics; a
softmax-regression layer is trained with SGD (Nesterov momentum, cosine lr) on them. The network
itself is never updated.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.schedule import make_optimizer, set_lr
from trainer.seeding import generator


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                       num_classes: int, epochs: int = 100, lr: float = 0.1, weight_decay: float = 1e-4,
                       batch_size: int = 256, seed: int = 0) -> dict:
    """Fit softmax regression on (train_x (N, F), train_y (N,)), report top-1 (percent) on both sets.

    Returns {"train_top1", "test_top1", "epochs"}. Deterministic for a given seed.
    """
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    g = generator(seed, "linear-probe")
    layer = torch.nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.01)
        layer.bias.zero_()
    opt = make_optimizer(layer.parameters(), lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    n = train_x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(train_x.device)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            set_lr(opt, 0.5 * lr * (1 + math.cos(math.pi * step / total)))
            loss = F.cross_entropy(layer(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        train_acc = (layer(train_x).argmax(1) == train_y).float().mean().item() * 100
        test_acc = (layer(test_x).argmax(1) == test_y).float().mean().item() * 100
    return {"train_top1": round(train_acc, 2), "test_top1": round(test_acc, 2), "epochs": epochs}

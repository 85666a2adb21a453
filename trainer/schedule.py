"""Optimiser and learning-rate schedule (pure functions).

SGD with Nesterov momentum 0.9, weight decay 5e-4 on every parameter, lr 0.03 (the authors'
configuration). The schedule restarts at every training round; the network, the optimiser's
momentum buffers and the memory bank carry over (as in the authors' loop).

The lr follows the authors' released code: StepPolicy with offset 80, step 40 and rate 0.1
computes base * 0.1 ** ((epoch - 80) // 40) from epoch 80 of 200, which first decays at epoch 120
and again at 160: milestones at 0.6 and 0.8 of a round, expressed as fractions so that short
rounds scale. (The paper's text reads "x0.1 after 80 epochs and every 40 after that", milestones
0.4, 0.6, 0.8; ``--lr-milestones 0.4,0.6,0.8`` gives that reading.)
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def lr_at(epoch: int, epochs_per_round: int, base_lr: float,
          milestones: Sequence[float] = (0.6, 0.8), gamma: float = 0.1) -> float:
    """The lr of ``epoch`` (0-based, within its round): base_lr * gamma^(milestones passed),
    where a milestone fraction f is passed once epoch >= f * epochs_per_round."""
    passed = sum(1 for f in milestones if epoch >= f * epochs_per_round)
    return base_lr * gamma ** passed


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.9,
                   weight_decay: float = 5e-4, nesterov: bool = True) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

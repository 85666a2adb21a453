"""Training-step throughput of one AND step on this machine (images/s): ``trainer speed``.

Measures, on random uint8 images: the model alone (forward + backward + SGD step), and the
whole step the loop runs (batched augmentation + model + softmax over an N-row memory bank +
AND loss + EMA update), after warm-up steps.
"""
from __future__ import annotations

import time

import torch

from trainer.augment import AugmentSpec, augment
from trainer.loss import and_loss
from trainer.memory import ema_update_, init_memory
from trainer.models import build_model
from trainer.schedule import make_optimizer


def step_speed(arch: str = "smallcnn", size: int = 32, batch: int = 128, n: int = 50000, steps: int = 20,
               device: str = "cpu") -> dict:
    """{"model only": images/s, "full AND step": images/s}."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(arch, size).to(dev)
    opt = make_optimizer(model.parameters(), 0.03)
    memory = init_memory(n, 128, torch.Generator().manual_seed(0), dev)
    spec = AugmentSpec(size, (0.5,) * 3, (0.25,) * 3)
    images = (torch.rand(batch, 3, size, size) * 255).to(torch.uint8).to(dev)
    normalised = augment(images, spec, torch.Generator().manual_seed(0))
    anchor = torch.ones(n, dtype=torch.bool, device=dev)
    neighbours = torch.randint(0, n, (n, 1), device=dev)
    g = torch.Generator().manual_seed(1)

    def model_only():
        loss = model(normalised).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def full_step():
        idx = torch.randint(0, n, (batch,), device=dev)
        feats = model(augment(images, spec, g))
        loss = and_loss(feats, memory, idx, anchor, neighbours, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update_(memory, idx, feats.detach(), 0.5)

    rates = {}
    for name, fn in (("model only", model_only), ("full AND step", full_step)):
        for _ in range(3):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rates[name] = round(steps * batch / (time.perf_counter() - start), 1)
    return rates

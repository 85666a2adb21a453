"""Training throughput of AND against plain supervised training of the same backbone: ``trainer speed``.

Both steps start from uint8 images already on the device and run the batched augmentation
there, the same precision, memory format and (optionally) torch.compile:

- supervised: backbone -> Linear(F, 10) -> cross-entropy -> SGD step;
- AND: the loop's own :func:`trainer.loop.train_step` (backbone -> 128-d head -> softmax over
  all N memory rows -> AND loss with every sample an anchor -> SGD step -> EMA update of the bank).

The two are timed in alternating blocks after warm-up (which includes any compilation), and the
median rate of each is reported with their ratio, all from one run, under the determinism setting
``trainer run`` trains with (``set_determinism``: deterministic kernels by default, which on a GPU
can be other, slower convolution and scatter kernels than torch would pick).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from trainer.augment import AugmentSpec, augment
from trainer.config import TrainConfig
from trainer.memory import init_memory
from trainer.models import build_model, compile_for_training
from trainer.schedule import make_optimizer
from trainer.seeding import set_determinism
from trainer.world import World

WARMUP_STEPS = 3
BLOCKS = 3


def step_speed(arch: str = "smallcnn", size: int = 32, batch: int = 128, n: int = 50000, steps: int = 20,
               device: str = "cpu", precision: str = "fp32", compile: bool = False,
               deterministic: bool = TrainConfig.deterministic) -> dict:
    """{"supervised": images/s, "AND": images/s, "ratio": AND / supervised}, measured with torch's
    deterministic algorithms on or off as ``deterministic`` says (the setting is restored after)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    set_determinism(deterministic)
    try:
        return _measure(arch, size, batch, n, steps, device, precision, compile)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _measure(arch: str, size: int, batch: int, n: int, steps: int, device: str, precision: str,
             compile: bool) -> dict:
    from trainer.loop import network_forward, train_step
    from trainer.round_anchors import RoundAnchors

    dev = torch.device(device)
    cfg = TrainConfig(precision=precision)
    spec = AugmentSpec(size, (0.5,) * 3, (0.25,) * 3)
    images = (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).to(dev)
    labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1)).to(dev)
    aug_gen = torch.Generator().manual_seed(2)

    torch.manual_seed(0)
    and_model = build_model(arch, size, cfg.dim).to(dev)
    backbone = build_model(arch, size, cfg.dim)
    supervised_model = torch.nn.Sequential(backbone.backbone, torch.nn.Linear(backbone.feature_dim, 10)).to(dev)
    if dev.type == "cuda":
        and_model = and_model.to(memory_format=torch.channels_last)
        supervised_model = supervised_model.to(memory_format=torch.channels_last)
    and_opt = make_optimizer(and_model.parameters(), cfg.lr)
    supervised_opt = make_optimizer(supervised_model.parameters(), cfg.lr)
    if compile:
        and_model, supervised_model = compile_for_training(and_model), compile_for_training(supervised_model)

    memory = init_memory(n, cfg.dim, torch.Generator().manual_seed(3), dev)
    every_sample_an_anchor = RoundAnchors(
        is_anchor=torch.ones(n, dtype=torch.bool, device=dev),
        neighbours=torch.randint(0, n, (n, 1), generator=torch.Generator().manual_seed(4)).to(dev),
        count=n, consistency=None)
    world = World.single(dev)
    index_gen = torch.Generator().manual_seed(5)

    def supervised_step():
        logits = network_forward(supervised_model, augment(images, spec, aug_gen), precision)
        loss = F.cross_entropy(logits, labels)
        supervised_opt.zero_grad(set_to_none=True)
        loss.backward()
        supervised_opt.step()

    def and_step():
        indices = torch.randint(0, n, (batch,), generator=index_gen).to(dev)
        train_step(and_model, and_opt, memory, augment(images, spec, aug_gen), indices, every_sample_an_anchor, cfg, world)

    def images_per_s(step_fn) -> float:
        _sync(dev)
        start = time.perf_counter()
        for _ in range(steps):
            step_fn()
        _sync(dev)
        return steps * batch / (time.perf_counter() - start)

    rates = {"supervised": [], "AND": []}
    for step_fn in (supervised_step, and_step):
        for _ in range(WARMUP_STEPS):
            step_fn()
    for _ in range(BLOCKS):
        rates["supervised"].append(images_per_s(supervised_step))
        rates["AND"].append(images_per_s(and_step))
    result = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    result["ratio"] = round(result["AND"] / result["supervised"], 3)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""The trainer on a CUDA GPU: the same augmentation as on CPU, a training step that never makes
the host wait for the GPU (so kernels queue ahead and the GPU is not starved), bf16 against fp32
on one batch, and short real runs in bf16 and with torch.compile. Skipped where no GPU is visible."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_augmentation_on_the_gpu_matches_the_cpu():
    from trainer.augment import AugmentSpec, augment

    spec = AugmentSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = (torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    cpu = augment(images, spec, torch.Generator().manual_seed(1))
    gpu = augment(images.cuda(), spec, torch.Generator().manual_seed(1))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_never_waits_for_the_gpu(precision):
    """Data indexing, augmentation, forward, AND loss, SGD step and memory update of staged
    digits, under torch's sync debug mode set to raise on any host synchronisation."""
    from trainer.config import TrainConfig
    from trainer.data import load_dataset
    from trainer.loop import train_step
    from trainer.memory import init_memory
    from trainer.models import build_model
    from trainer.schedule import make_optimizer
    from trainer.seeding import generator, set_determinism
    from trainer.sharding import epoch_batches
    from trainer.round_anchors import RoundAnchors
    from trainer.world import World

    device = torch.device("cuda")
    cfg = TrainConfig(precision=precision)
    deterministic = torch.are_deterministic_algorithms_enabled()
    set_determinism(cfg.deterministic)                  # as the loop runs it
    data = load_dataset("digits")
    data.stage(device)
    n = len(data.train)
    torch.manual_seed(0)
    model = build_model("smallcnn", data.image_size, cfg.dim).to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), cfg.lr)
    memory = init_memory(n, cfg.dim, generator(0, "memory"), device)
    anchor = torch.zeros(n, dtype=torch.bool, device=device)
    anchor[: n // 2] = True
    neighbours = torch.randint(0, n, (n, 1), device=device)
    half_anchors = RoundAnchors(anchor, neighbours, n // 2, None)
    world = World.single(device)
    batches = epoch_batches(n, 0, 1, 0, 0, 1, cfg.batch_size)
    steps = data.train_batches(batches, generator(0, "augment", 1, 0), device)
    images, indices = next(steps)
    train_step(model, optimizer, memory, images, indices, half_anchors, cfg, world)     # warm-up: allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            images, indices = next(steps)
            loss = train_step(model, optimizer, memory, images, indices, half_anchors, cfg, world)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.use_deterministic_algorithms(deterministic)
    assert torch.isfinite(loss).item()
    torch.testing.assert_close(memory.norm(dim=1), torch.ones(n, device=device))


def test_bf16_loss_and_gradient_agree_with_fp32_on_the_gpu():
    """tests/test_precision.py's comparison of one batch (tolerances derived there) with the GPU's
    bf16 kernels: features, AND loss and parameter gradient within bf16's rounding."""
    from tests.test_precision import assert_bf16_agrees_with_fp32, bf16_against_fp32

    assert_bf16_agrees_with_fp32(bf16_against_fp32("cuda"))


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--precision", "bf16"], ["--precision", "bf16", "--compile"]])
def test_a_short_cuda_run_completes(tmp_path, flags):
    import json

    from click.testing import CliRunner

    from trainer.cli import main

    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--device", "cuda", "--rounds", "1", "--epochs-per-round", "2",
                                       "--run-dir", str(run), *flags])
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_knn_top1"] > 30.0 and summary["config"]["precision"] == "bf16"

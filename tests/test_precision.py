"""bf16 autocast against fp32 on one batch: the features, the AND loss and the gradient of the
network's parameters, through the trainer's own forward (trainer.loop.network_forward) and loss
(trainer.loss.and_loss). Runs on CPU (autocast does bf16 there too); tests/test_trainer_cuda.py
runs the same comparison on a GPU.

The tolerances, from bf16's 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3), checked against
what was measured for smallcnn on digits over seeds 0-9 (CPU, torch 2.14; the test runs seed 0):
- features (rows of unit norm): max |bf16 - fp32| <= 2u = 7.8e-3. Each element is the normalised
  output of a chain of rounded products, one rounding of u at the last step and less than that
  carried from before; measured at most 3.0e-3 (0.76u).
- loss: relative difference <= u / 4 = 9.8e-4. The loss is a batch mean of log-softmax terms whose
  logits move by (feature error) / tau, and that move mostly cancels between the sample's own
  logit and the logsumexp over the bank; measured at most 4.6e-5. (A loss or bank computed in bf16
  would be off by about u.)
- gradient of all parameters: ||g_bf16 - g_fp32|| / ||g_fp32|| <= 48u = 0.19. Roundings compound
  through the layers forward and backward, and batch norm's backward subtracts means that cancel
  most of its input; measured 0.044 to 0.085 (11u to 22u), so the bound leaves a 2x margin for
  other kernels (a GPU's).
"""
from __future__ import annotations

import torch

U_BF16 = 2.0 ** -8
FEATURE_TOL = 2 * U_BF16
LOSS_REL_TOL = U_BF16 / 4
GRAD_REL_TOL = 48 * U_BF16


def bf16_against_fp32(device: str, arch: str = "smallcnn", seed: int = 0) -> dict:
    """The same batch of augmented digits, anchors and memory bank through the trainer's forward
    and AND loss at fp32 and under bf16 autocast. Returns the features (B, dim) float32, the
    losses (scalars) and the flattened parameter gradients (P,) of each precision, by precision."""
    from trainer.config import TrainConfig
    from trainer.data import load_dataset
    from trainer.loop import network_forward
    from trainer.loss import and_loss
    from trainer.models import build_model
    from trainer.seeding import generator
    from trainer.sharding import epoch_batches

    dev = torch.device(device)
    cfg = TrainConfig()
    data = load_dataset("digits")
    n = len(data.train)
    torch.manual_seed(seed)
    model = build_model(arch, data.image_size, cfg.dim).to(dev)
    batches = epoch_batches(n, seed, 0, 0, 0, 1, cfg.batch_size)
    images, indices = next(data.train_batches(batches, generator(seed, "augment", 0, 0), dev))
    # A bank of the network's own fp32 features of every training image (what training keeps in
    # it), so the batch's rows have the large own-row logits a real bank gives.
    with torch.no_grad():
        model.eval()
        every_row = [torch.arange(start, min(start + 500, n)) for start in range(0, n, 500)]
        bank = torch.cat([network_forward(model, rows_images, "fp32")
                          for rows_images, _ in data.train_batches(every_row, generator(seed, "bank"), dev)])
        model.train()
    g = torch.Generator().manual_seed(seed)
    anchor = (torch.rand(n, generator=g) < 0.5).to(dev)
    neighbours = torch.randint(0, n, (n, cfg.k), generator=g).to(dev)
    out = {}
    for precision in ("fp32", "bf16"):   # training mode: batch norm uses the batch's statistics in both
        model.zero_grad(set_to_none=True)
        features = network_forward(model, images, precision)
        loss = and_loss(features, bank, indices, anchor, neighbours, cfg.tau)
        loss.backward()
        out[precision] = {"features": features.detach(), "loss": loss.detach(),
                          "grad": torch.cat([p.grad.flatten() for p in model.parameters()])}
    return out


def assert_bf16_agrees_with_fp32(out: dict) -> None:
    fp32, bf16 = out["fp32"], out["bf16"]
    # What follows the network stays float32 under autocast (trainer.loop.network_forward).
    assert bf16["features"].dtype == bf16["loss"].dtype == torch.float32
    feature_error = (bf16["features"] - fp32["features"]).abs().max().item()
    # Not vacuous: the bf16 pass really ran at another precision.
    assert feature_error > U_BF16 / 64, f"bf16 features equal fp32 ones ({feature_error:.1e}): autocast did not run"
    assert feature_error <= FEATURE_TOL, f"features differ by {feature_error:.2e} > {FEATURE_TOL:.2e}"
    loss_error = abs(bf16["loss"].item() - fp32["loss"].item()) / abs(fp32["loss"].item())
    assert loss_error <= LOSS_REL_TOL, f"loss differs by {loss_error:.2e} (relative) > {LOSS_REL_TOL:.2e}"
    grad_error = ((bf16["grad"] - fp32["grad"]).norm() / fp32["grad"].norm()).item()
    assert grad_error <= GRAD_REL_TOL, f"gradient differs by {grad_error:.3f} (relative L2) > {GRAD_REL_TOL:.3f}"


def test_bf16_loss_and_gradient_agree_with_fp32_on_cpu():
    assert_bf16_agrees_with_fp32(bf16_against_fp32("cpu"))

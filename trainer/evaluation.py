"""Weighted kNN evaluation of a training run (Wu et al.'s protocol), split over the ranks."""
from __future__ import annotations

import math

import torch

from trainer.config import TrainConfig
from trainer.data import ImageDataset
from trainer.knn import embed, knn_predict
from trainer.models import unwrap
from trainer.world import World


def evaluate_knn(model: torch.nn.Module, memory: torch.Tensor, data: ImageDataset, cfg: TrainConfig,
                 world: World, recompute: bool | None = None) -> float:
    """Weighted kNN top-1 (percent) of the test set against the memory bank (N, d) or, with
    ``recompute`` (None: cfg.eval_recompute), against train features recomputed without
    augmentation. Changes neither the model (eval mode + no_grad, train mode restored) nor the
    bank. Each rank classifies its slice of the test set; the counts are summed over ranks."""
    model = unwrap(model)
    device = world.device
    batch = max(256, cfg.batch_size)
    bank, bank_labels = memory, data.train.labels.to(device)
    if cfg.eval_recompute if recompute is None else recompute:
        bank = embed_split(model, data, "train", batch, world)
    start, stop = _rank_slice(len(data.test), world)
    feats, labels = embed(model, data.eval_batches("test", batch, start, stop), device)
    if feats.shape[0]:
        predicted = knn_predict(feats, bank, bank_labels, data.num_classes, cfg.knn_k, cfg.knn_sigma)
        correct = float((predicted == labels).sum())
    else:
        correct = 0.0
    totals = world.all_reduce_sum(torch.tensor([correct, float(feats.shape[0])], device=device))
    return round(100.0 * float(totals[0]) / float(totals[1]), 2)


def _rank_slice(n: int, world: World) -> tuple[int, int]:
    per = math.ceil(n / world.world_size)
    return min(n, world.rank * per), min(n, (world.rank + 1) * per)


def embed_split(model, data: ImageDataset, split: str, batch: int, world: World, head: bool = True) -> torch.Tensor:
    """(N, dim) head features (head=False: (N, F) backbone features) of a whole split without
    augmentation: each rank embeds its slice, then all-gather. Every rank calls this."""
    model = unwrap(model)
    n = len(data.split(split))
    start, stop = _rank_slice(n, world)
    feats, _ = embed(model, data.eval_batches(split, batch, start, stop), world.device, head)
    per = math.ceil(n / world.world_size)
    width = model.head.out_features if head else model.feature_dim
    padded = torch.zeros(per, width, device=world.device)
    padded[: feats.shape[0]] = feats
    return world.all_gather_cat(padded)[:n]

"""Weighted kNN classification (the evaluation of Wu et al. 2018 and the AND code).

For a query q (unit norm): take the K most similar training features s_1..s_K (cosine), weight
each by exp(s / sigma), sum the weights per class; the prediction is the class with the largest
sum (ties -> the lower class index). Queries are processed in chunks so that the (chunk, N)
similarity block stays within a fixed element budget, whatever N is.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Largest (chunk x N) similarity block computed at once: 2^25 float32 = 128 MiB.
SIMILARITY_BUDGET = 1 << 25


def knn_class_scores(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                     k: int = 200, sigma: float = 0.1) -> torch.Tensor:
    """Class vote totals (Q, C): sum over the top-k neighbours j of exp(s_j / sigma) one_hot(label_j).

    query (Q, d), bank (N, d), both L2-normalised rows; bank_labels (N,) int64; requires k <= N.
    """
    sims = query @ bank.t()  # (Q, N)
    top_sim, top_idx = sims.topk(k, dim=1, largest=True, sorted=True)
    weights = (top_sim / sigma).exp()
    labels = bank_labels[top_idx]  # (Q, k)
    scores = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=query.device)
    return scores.scatter_add_(1, labels, weights)


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, sigma: float = 0.1, budget: int = SIMILARITY_BUDGET) -> torch.Tensor:
    """Predicted classes (Q,) int64, computed ``budget // N`` queries at a time."""
    if k > bank.shape[0]:
        raise ValueError(f"kNN with k={k} needs at least k training features, got {bank.shape[0]}")
    bank_labels = bank_labels.to(bank.device)
    chunk = max(1, budget // max(1, bank.shape[0]))
    out = [knn_class_scores(query[s:s + chunk].to(bank.device), bank, bank_labels, num_classes, k, sigma).argmax(dim=1)
           for s in range(0, query.shape[0], chunk)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=bank.device)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and no_grad inside; the model's previous train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def iter_embed(model: torch.nn.Module, batches, device: torch.device,
               head: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each (images, labels) batch, in order and without augmentation: (features (b, dim) head
    features, or (b, F) backbone features with head=False, float32 on ``device``; labels (b,)).
    The model is in eval mode without gradients while this runs and unchanged after."""
    with evaluating(model):
        for images, batch_labels in batches:
            images = images.to(device, non_blocking=True)
            out = model(images) if head else model.embed(images)
            yield out.float(), batch_labels.to(device)


def embed(model: torch.nn.Module, batches, device: torch.device, head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every (images, labels) batch, in order, without augmentation, leaving the
    model unchanged: (N, dim) head features (or (N, F) backbone features with head=False), (N,) labels."""
    feats, labels = [], []
    for batch_feats, batch_labels in iter_embed(model, batches, device, head):
        feats.append(batch_feats)
        labels.append(batch_labels)
    return torch.cat(feats), torch.cat(labels)

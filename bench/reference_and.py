"""A deliberately minimal AND (Huang et al., ICML 2019) to hold the project's trainer against.

    .venv/bin/python bench/reference_and.py --data digits --method and --seed 0
    .venv/bin/python bench/reference_and.py --data /tmp/cifar10-10k --epochs 10 --method instance

One file, plain tensors: no store, no sharding, no distributed code, no batched augmentation
(torchvision's per-image PIL transforms in a DataLoader, as the authors ran them). Written from
the paper and the authors' released code (github.com/Raymond-sci/AND: main.py, lib/criterion.py,
lib/non_parametric_classifier.py, lib/ans_discovery.py, lib/protocols.py, configs/base.yaml and
cifar10.yaml; the Instance baseline is zhirongw/lemniscate.pytorch's cifar.py). Where the paper's
text and the released code differ, this follows the code:

- lr 0.03, x0.1 at 60% and again at 80% of every round (StepPolicy with offset 80, step 40 of 200
  epochs; the paper's text says "x0.1 every 40 epochs after 80");
- no horizontal flip (``random_horizontal_flip`` is commented out in base.yaml);
- memory bank initialised uniformly in [-s, s], s = 1 / sqrt(d / 3), rows not normalised;
- test kNN (K = 200, weight exp(s / 0.1)) against the memory bank after every epoch, and once at
  the end against train features recomputed without augmentation (as the released code
  evaluates a trained model).

Nothing here is imported from the project: this file is the independent reference. The project's
``bench/accuracy.py`` trains both at the same data, budget and seeds.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import click
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets, transforms

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # the authors' cifar.py


# ----------------------------------------------------------------------------- data


class Instances(torch.utils.data.Dataset):
    """(image, label, index) over a list of PIL images: the index addresses the memory bank."""

    def __init__(self, images: list, labels: list[int], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), self.labels[index], index


def load_pil(data: str) -> tuple[list, list[int], list, list[int]]:
    """(train images, train labels, test images, test labels) as RGB PIL images.

    ``digits``: scikit-learn's 8x8 digits, permuted with RandomState(0), 1,500 train / 297 test
    (the split the project uses). Otherwise ``data`` is a folder with train/<class>/ and test/<class>/.
    """
    from PIL import Image

    if data == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        order = np.random.RandomState(0).permutation(len(bunch.target))
        pixels = np.round(np.clip(bunch.images[order] / 16.0, 0, 1) * 255).astype(np.uint8)
        images = [Image.fromarray(p, mode="L").convert("RGB") for p in pixels]
        labels = bunch.target[order].tolist()
        return images[:1500], labels[:1500], images[1500:], labels[1500:]
    splits = []
    for split in ("train", "test"):
        folder = datasets.ImageFolder(os.path.join(data, split))
        splits.append([folder.loader(path) for path, _ in folder.samples])
        splits.append([label for _, label in folder.samples])
    return tuple(splits)


def channel_stats(images: list) -> tuple[tuple, tuple]:
    """Per-channel mean and std over every pixel of the training images, in [0, 1]."""
    x = np.stack([np.asarray(img, dtype=np.float64) / 255.0 for img in images]).reshape(-1, 3)
    return tuple(x.mean(0).round(4).tolist()), tuple(x.std(0, ddof=1).round(4).tolist())


def pipelines(size: int, mean, std, hflip: bool):
    """The authors' train transform (packages/datasets get_transforms with base.yaml) and test transform."""
    train = [transforms.RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(0.75, 1.333333)),
             transforms.ColorJitter(0.4, 0.4, 0.4, 0.4), transforms.RandomGrayscale(0.2)]
    if hflip:
        train.append(transforms.RandomHorizontalFlip())
    tail = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    test = [transforms.Resize(size), transforms.CenterCrop(size)]
    return transforms.Compose(train + tail), transforms.Compose(test + tail)


# ----------------------------------------------------------------------------- model


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (32, 64, 128 channels), max-pool after the first two, global
    average pool, a linear head to ``dim``, L2 normalisation: (B, 3, S, S) -> (B, dim)."""

    def __init__(self, dim: int = 128, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(3, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                                      *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, dim)

    def forward(self, x):
        return F.normalize(self.head(self.features(x)), dim=1)


def resnet18_cifar(dim: int = 128) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool) and a
    normalised ``dim``-d head, as the authors' models/resnet_cifar.py."""
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=dim)
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return nn.Sequential(net, Normalize())


class Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=1)


# ----------------------------------------------------------------------------- the method


def init_memory(n: int, dim: int) -> torch.Tensor:
    """(N, dim): the authors' NonParametricClassifier init, uniform in [-s, s], s = 1/sqrt(dim/3)."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(n, dim).mul_(2 * stdv).add_(-stdv)


def criterion(logits: torch.Tensor, indices: torch.Tensor, position: torch.Tensor,
              neighbours: torch.Tensor) -> torch.Tensor:
    """The authors' Criterion, written as they wrote it (softmax, then log of the summed p).

    logits (B, N) = x_i . m_j / tau; indices (B,); position (N,): the row of each anchor in
    ``neighbours`` (A, k), -1 for instance samples. Anchors: -log(p_ii + sum_{j in N(i)} p_ij);
    others: -log p_ii; summed, divided by B.
    """
    preds = F.softmax(logits, dim=1)
    pos = position[indices]
    is_anchor = pos >= 0
    p_self = preds.gather(1, indices.view(-1, 1)).squeeze(1)
    loss = -torch.log(p_self[~is_anchor]).sum()
    if is_anchor.any():
        hood = neighbours[pos[is_anchor]]
        p_hood = p_self[is_anchor] + preds[is_anchor].gather(1, hood).sum(1)
        loss = loss - torch.log(p_hood).sum()
    return loss / indices.numel()


@torch.no_grad()
def update_memory(memory: torch.Tensor, indices: torch.Tensor, features: torch.Tensor, momentum: float) -> None:
    """m_i <- normalise(momentum m_i + (1 - momentum) x_i) (Eq 8; momentum 0.5)."""
    rows = memory[indices] * momentum + features * (1 - momentum)
    memory[indices] = rows / rows.norm(dim=1, keepdim=True)


@torch.no_grad()
def discover_anchors(memory: torch.Tensor, count: int, k: int, tau: float, chunk: int = 1024):
    """ANsDiscovery.update: entropy of softmax(m_i . M / tau) for every row (self included), the
    ``count`` lowest-entropy rows as anchors, their k nearest rows by m_i . m_j (self excluded).

    Returns (position (N,) int64, neighbours (count, k) int64, anchor indices (count,))."""
    n = memory.shape[0]
    entropy = torch.empty(n)
    for s in range(0, n, chunk):
        logp = F.log_softmax(memory[s:s + chunk] @ memory.t() / tau, dim=1)
        entropy[s:s + chunk] = -(logp.exp() * logp).sum(1)
    anchors = entropy.topk(count, largest=False).indices
    position = torch.full((n,), -1, dtype=torch.long)
    position[anchors] = torch.arange(count)
    neighbours = torch.empty(count, k, dtype=torch.long)
    for s in range(0, count, chunk):
        sims = memory[anchors[s:s + chunk]] @ memory.t()
        sims.scatter_(1, anchors[s:s + chunk].view(-1, 1), -1.0)
        neighbours[s:s + chunk] = sims.topk(k, dim=1).indices
    return position, neighbours, anchors


@torch.no_grad()
def knn_top1(net: nn.Module, memory: torch.Tensor, train_labels: torch.Tensor, loader, classes: int,
             k: int = 200, sigma: float = 0.1) -> float:
    """lib/protocols.kNN: weighted vote of the K most similar memory rows; percent top-1."""
    net.eval()
    correct = total = 0
    for images, labels, _ in loader:
        sims = net(images) @ memory.t()
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(images.shape[0], classes).scatter_add_(1, train_labels[idx], (top / sigma).exp())
        correct += int((votes.argmax(1) == labels).sum())
        total += labels.numel()
    net.train()
    return 100.0 * correct / total


@torch.no_grad()
def embed(net: nn.Module, loader) -> torch.Tensor:
    """(N, dim) features of every image of ``loader``, in order, in eval mode."""
    net.eval()
    features = torch.cat([net(images) for images, _, _ in loader])
    net.train()
    return features


def step_lr(epoch: int, epochs: int, base: float = 0.03) -> float:
    """StepPolicy(base, offset 80, step 40, rate 0.1) of a 200-epoch round, scaled to ``epochs``:
    base until 60% of the round, x0.1 from 60%, x0.01 from 80%."""
    return base * 0.1 ** sum(epoch >= f * epochs for f in (0.6, 0.8))


def run(data: str, method: str = "and", seed: int = 0, rounds: int = 5, epochs: int = 10, arch: str = "smallcnn",
        batch_size: int = 128, tau: float = 0.1, momentum: float = 0.5, k: int = 1, hflip: bool = False,
        stats: str = "train", log=print) -> dict:
    """Train ``rounds`` rounds (round 0 instance loss, then the curriculum) of ``epochs`` each.

    method: and (anchors 1/R, 2/R, ... of N by entropy), and-oneoff (every sample an anchor from
    round 1), instance (no anchors). Returns per-epoch and per-round kNN, anchors, consistency."""
    torch.manual_seed(seed)
    train_images, train_labels, test_images, test_labels = load_pil(data)
    size = train_images[0].size[0]
    mean, std = CIFAR10_STATS if stats == "cifar10" else channel_stats(train_images)
    train_tf, test_tf = pipelines(size, mean, std, hflip)
    train_set = Instances(train_images, train_labels, train_tf)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    test_loader = torch.utils.data.DataLoader(Instances(test_images, test_labels, test_tf), batch_size=256)
    n, classes = len(train_set), max(train_labels) + 1
    labels = torch.tensor(train_labels)

    net = SmallCNN() if arch == "smallcnn" else resnet18_cifar()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4, nesterov=True)
    memory = init_memory(n, 128)
    position = torch.full((n,), -1, dtype=torch.long)
    neighbours = torch.empty(0, k, dtype=torch.long)
    history, per_round = [], []
    start = time.perf_counter()
    for r in range(rounds):
        consistency = None
        if r > 0 and method != "instance":
            count = n if method == "and-oneoff" else int(n * r / (rounds - 1))
            position, neighbours, anchors = discover_anchors(memory, count, k, tau)
            consistency = 100.0 * float((labels[neighbours] == labels[anchors].view(-1, 1)).float().mean())
        anchors_n = int((position >= 0).sum())
        for epoch in range(epochs):
            lr = step_lr(epoch, epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            net.train()
            loss_sum, seen, epoch_start = 0.0, 0, time.perf_counter()
            for images, _, indices in loader:
                features = net(images)
                loss = criterion(features @ memory.t() / tau, indices, position, neighbours)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                update_memory(memory, indices, features.detach(), momentum)
                loss_sum += float(loss.detach()) * indices.numel()
                seen += indices.numel()
            train_seconds = time.perf_counter() - epoch_start
            knn = knn_top1(net, memory, labels, test_loader, classes)
            history.append({"round": r, "epoch": epoch, "loss": loss_sum / seen, "lr": lr, "knn_top1": knn,
                            "images_per_s": round(seen / train_seconds, 1)})
            log(f"round {r} epoch {epoch + 1}/{epochs}  loss {loss_sum / seen:.4f}  lr {lr:.5f}  kNN {knn:.2f}%")
        per_round.append({"round": r, "knn_top1": history[-1]["knn_top1"], "anchors": anchors_n,
                          "consistency": consistency})
    best = max(history, key=lambda h: h["knn_top1"])
    # The released code's evaluation of a trained model (lemniscate's cifar.py after training,
    # AND's --test-only): the train features recomputed with the test transform, not the bank.
    train_eval = torch.utils.data.DataLoader(Instances(train_images, train_labels, test_tf), batch_size=256)
    recomputed = knn_top1(net, embed(net, train_eval), labels, test_loader, classes)
    log(f"final kNN against recomputed train features {recomputed:.2f}%")
    return {"data": data, "method": method, "seed": seed, "rounds": per_round, "epochs": history,
            "final_knn_top1": history[-1]["knn_top1"], "final_knn_top1_recomputed": recomputed,
            "best_epoch": {"round": best["round"], "epoch": best["epoch"], "knn_top1": best["knn_top1"]},
            "mean_images_per_s": round(float(np.mean([h["images_per_s"] for h in history])), 1),
            "seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads()}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", default="digits", show_default=True, help="digits, or a folder with train/ and test/")
@click.option("--method", type=click.Choice(["and", "instance", "and-oneoff"]), default="and", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--rounds", type=int, default=5, show_default=True, help="training rounds, round 0 included")
@click.option("--epochs", type=int, default=30, show_default=True, help="epochs per round")
@click.option("--arch", type=click.Choice(["smallcnn", "resnet18"]), default="smallcnn", show_default=True)
@click.option("--hflip/--no-hflip", default=False, show_default=True)
@click.option("--stats", type=click.Choice(["train", "cifar10"]), default="train", show_default=True,
              help="normalisation: the training set's channel statistics, or the authors' CIFAR-10 ones")
@click.option("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
@click.option("--out", default=None, help="write the result as JSON here")
def main(data, method, seed, rounds, epochs, arch, hflip, stats, threads, out):
    """Train the minimal reference AND and print kNN top-1 per epoch and per round."""
    if threads:
        torch.set_num_threads(threads)
    result = run(data, method, seed, rounds, epochs, arch, hflip=hflip, stats=stats)
    print(json.dumps({k: result[k] for k in ("rounds", "final_knn_top1", "best_epoch", "seconds")}, indent=1))
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())

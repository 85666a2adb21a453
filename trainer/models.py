"""Backbones with the paper's 128-d L2-normalised linear head.

Every model maps images (B, 3, H, W) to features (B, dim), rows of unit L2 norm, and exposes
``embed`` (B, F): the backbone's pooled features before the head, which the linear probe trains on
(the head's output is what the memory bank and the kNN evaluation use).

- ``smallcnn`` (default): three 3x3 conv blocks, fast enough for 2 CPU cores at 32x32.
- ``resnet18`` / ``resnet50``: torchvision ResNets; for small inputs (<= 64 px) the CIFAR stem
  (3x3 conv stride 1, no max-pool) as in the authors' ResNet for CIFAR.
- ``alexnet``: the authors' 32x32 AlexNet variant (5 conv + BN, two 1024-wide FC + BN layers);
  for larger inputs their ImageNet variant (11x11 stride-4 stem).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import ARCHS
from trainer.errors import TrainerError

# Inputs up to this size get the small-image variants (CIFAR stem, 32x32 AlexNet).
SMALL_IMAGE_MAX = 64


class EmbeddingModel(nn.Module):
    """backbone (B, 3, H, W) -> (B, F) -> Linear(F, dim) -> L2 normalise -> (B, dim)."""

    # How images are prepared for this model (trainer.embedding.InputSpec); set by trainer.load_model.
    input_spec = None

    def __init__(self, backbone: nn.Module, feature_dim: int, dim: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, dim)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, F) backbone features (no head, not normalised)."""
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, dim), every row of unit L2 norm."""
        return F.normalize(self.head(self.backbone(images)), dim=1)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(width: int = 32) -> tuple[nn.Module, int]:
    """Three conv blocks (width, 2*width, 4*width channels), max-pool after the first two,
    global average pool: (B, 3, H, W) -> (B, 4*width). About 10 MMAC per 32x32 image."""
    layers = [
        *_conv_bn_relu(3, width), nn.MaxPool2d(2),
        *_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
        *_conv_bn_relu(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ]
    return nn.Sequential(*layers), 4 * width


def resnet(depth: int, small_images: bool) -> tuple[nn.Module, int]:
    """torchvision ResNet-18/50 without its classifier: (B, 3, H, W) -> (B, 512 or 2048)."""
    import torchvision

    net = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth](weights=None)
    if small_images:
        # CIFAR stem: a 7x7 stride-2 conv plus max-pool would shrink 32x32 to 8x8 before the
        # first block and lose most of the spatial detail small images have.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def alexnet(small_images: bool) -> tuple[nn.Module, int]:
    """The authors' AlexNet variants with BatchNorm: (B, 3, 32, 32) -> (B, 1024) for small
    images (3x3 stride-1 convs, three 2x2 max-pools: 32 -> 4), (B, 3, 224, 224) -> (B, 4096)
    otherwise (11x11 stride-4 stem, three 3x3 stride-2 max-pools, 6x6 before the FC layers)."""
    def conv(cin, cout, kernel, stride=1, padding=1):
        return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    def fc(cin, cout):
        return [nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]

    if small_images:
        features = [*conv(3, 64, 3), nn.MaxPool2d(2), *conv(64, 192, 3), nn.MaxPool2d(2),
                    *conv(192, 384, 3), *conv(384, 256, 3), *conv(256, 256, 3), nn.MaxPool2d(2)]
        # The 32x32 variant's FC input is fixed at 256 x 4 x 4; adaptive pooling makes other
        # small sizes (e.g. 48 px) work and is the identity at 32 px.
        pooled, width = 4, 1024
    else:
        features = [*conv(3, 64, 11, stride=4, padding=2), nn.MaxPool2d(3, 2),
                    *conv(64, 192, 5, padding=2), nn.MaxPool2d(3, 2),
                    *conv(192, 384, 3), *conv(384, 256, 3), *conv(256, 256, 3), nn.MaxPool2d(3, 2)]
        pooled, width = 6, 4096
    backbone = nn.Sequential(*features, nn.AdaptiveAvgPool2d(pooled), nn.Flatten(),
                             *fc(256 * pooled * pooled, width), *fc(width, width))
    return backbone, width


def build_model(arch: str, image_size: int, dim: int = 128) -> EmbeddingModel:
    """The named backbone plus the ``dim``-d normalised head, for ``image_size`` inputs.

    Initialisation draws from torch's global RNG: seed it first for a reproducible model.
    """
    small = image_size <= SMALL_IMAGE_MAX
    if arch == "smallcnn":
        backbone, feature_dim = small_cnn()
    elif arch == "resnet18":
        backbone, feature_dim = resnet(18, small)
    elif arch == "resnet50":
        backbone, feature_dim = resnet(50, small)
    elif arch == "alexnet":
        backbone, feature_dim = alexnet(small)
    else:
        raise TrainerError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    return EmbeddingModel(backbone, feature_dim, dim)


def backbone_dim(arch: str, image_size: int) -> int:
    """F, the width of ``arch``'s backbone features for ``image_size`` inputs, without allocating
    or initialising weights (the model is built on the meta device)."""
    with torch.device("meta"):
        return build_model(arch, image_size).feature_dim


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile and DistributedDataParallel wrappers (the model itself
    otherwise), so checkpoints never carry ``_orig_mod.`` or DDP's ``module.`` prefixes."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


def check_compiler() -> None:
    """One-line error when torch.compile cannot work here: inductor builds its CPU kernels, and
    Triton its GPU kernel launchers, with the C/C++ compiler on PATH."""
    import os
    import shutil

    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise TrainerError("--compile needs a C++ compiler on PATH (g++ or clang++; set CXX for another): "
                           "install one or drop --compile")


def compile_for_training(model: nn.Module) -> nn.Module:
    """``torch.compile`` (inductor) of the module the training step calls; (B, 3, S, S) -> (B, dim).

    Static shapes: an epoch has at most two batch sizes (``trainer.sharding``), so inductor
    compiles at most two specialised graphs instead of one slower dynamic one. The first
    steps pay the compilation (tens of seconds); evaluation keeps running the eager module.
    Under DDP the compiled graph is split at gradient-bucket boundaries so the all-reduces
    still overlap the backward pass. Callers run :func:`check_compiler` first, before they
    write anything.
    """
    return torch.compile(model, dynamic=False)

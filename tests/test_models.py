"""Backbones: 128-d unit features for every arch and input size, the CIFAR stem, seeded init."""
from __future__ import annotations

import pytest
import torch

from trainer.errors import TrainerError
from trainer.models import build_model, unwrap


@pytest.mark.parametrize("arch, size, feature_dim", [
    ("smallcnn", 8, 128), ("smallcnn", 32, 128),
    ("resnet18", 8, 512), ("resnet18", 32, 512), ("resnet18", 96, 512),
    ("resnet50", 32, 2048),
    ("alexnet", 8, 1024), ("alexnet", 32, 1024), ("alexnet", 224, 4096),
])
def test_every_arch_gives_unit_128d_features(arch, size, feature_dim):
    torch.manual_seed(0)
    model = build_model(arch, size)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 128)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert model.embed(x).shape == (2, feature_dim) and model.feature_dim == feature_dim


def test_small_images_get_the_cifar_stem():
    small, large = build_model("resnet18", 32), build_model("resnet18", 224)
    assert small.backbone.conv1.kernel_size == (3, 3) and small.backbone.conv1.stride == (1, 1)
    assert isinstance(small.backbone.maxpool, torch.nn.Identity)
    assert large.backbone.conv1.kernel_size == (7, 7) and isinstance(large.backbone.maxpool, torch.nn.MaxPool2d)


def test_alexnet_32px_is_the_authors_layout():
    convs = [m for m in build_model("alexnet", 32).backbone if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 64, (3, 3), (1, 1)), (64, 192, (3, 3), (1, 1)), (192, 384, (3, 3), (1, 1)),
        (384, 256, (3, 3), (1, 1)), (256, 256, (3, 3), (1, 1))]
    linears = [m for m in build_model("alexnet", 32).backbone if isinstance(m, torch.nn.Linear)]
    assert [(linear.in_features, linear.out_features) for linear in linears] == [(4096, 1024), (1024, 1024)]


def test_init_is_seeded_and_unknown_arch_is_refused():
    torch.manual_seed(3)
    a = build_model("smallcnn", 8).state_dict()
    torch.manual_seed(3)
    b = build_model("smallcnn", 8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainerError, match="unknown arch 'vgg'"):
        build_model("vgg", 32)


def test_unwrap_strips_a_ddp_style_wrapper():
    model = build_model("smallcnn", 8)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(Wrapper(model)) is model and unwrap(model) is model
    assert not any(k.startswith("module.") for k in unwrap(Wrapper(model)).state_dict())

"""Datasets, the batched augmentation and the per-rank sharding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from trainer import augment as A
from trainer.data import DataError, load_dataset
from trainer.sharding import epoch_batches, epoch_permutation, global_batch_bounds


# ---------------------------------------------------------------- datasets

def test_digits_is_a_fixed_1500_297_split_at_native_size():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert (len(a.train), len(a.test), a.num_classes, a.image_size) == (1500, 297, 10, 8)
    assert a.train.images.shape == (1500, 3, 8, 8) and a.train.images.dtype == torch.uint8
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert torch.equal(a.train.images[:, 0], a.train.images[:, 2])          # grey in 3 channels
    assert a.train.labels.bincount().tolist() == [151, 157, 142, 155, 143, 157, 151, 148, 151, 145]
    assert a.dataset_id == "digits:sklearn:n=1500:size=8"


def test_synthetic_is_deterministic():
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    assert (len(a.train), len(a.test), a.image_size) == (400, 100, 32)
    assert torch.equal(a.train.images, b.train.images)
    assert a.train.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_instance_dataset_returns_image_label_index():
    data = load_dataset("digits")
    image, label, index = data.instance_dataset("train", train=True)[7]
    assert torch.equal(image, data.train.images[7]) and label == int(data.train.labels[7]) and index == 7


def _folder(root, split_classes: dict, size=8, count=3):
    for split, classes in split_classes.items():
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(count):
                pixels = np.full((size, size, 3), 40 * c + 10 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")


def test_small_image_folder_is_loaded_into_memory(tmp_path):
    _folder(tmp_path, {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    data = load_dataset("imagefolder", str(tmp_path))
    assert data.in_memory and data.image_size == 8 and data.classes == ["cat", "dog"]
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.train.images[4, :, 0, 0].tolist() == [50, 50, 50]           # dog, image 1


def test_large_image_folder_is_streamed_with_seeded_transforms(tmp_path):
    _folder(tmp_path, {"train": ["a", "b"], "test": ["a", "b"]}, size=80, count=2)
    data = load_dataset("imagefolder", str(tmp_path), image_size=72, workers=0)
    assert not data.in_memory and data.train.files[0].endswith("a/0.png")
    batches = [torch.tensor([0, 3]), torch.tensor([1, 2])]
    runs = [list(data.train_batches(batches, torch.Generator().manual_seed(5), torch.device("cpu")))
            for _ in range(2)]
    images, idx = runs[0][0]
    assert images.shape == (2, 3, 72, 72) and idx.tolist() == [0, 3]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(*runs))
    test_images, labels = next(data.eval_batches("test", 8))
    assert test_images.shape == (4, 3, 72, 72) and labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("layout, message", [
    ({"test": ["a"]}, "has no train/ folder"),
    ({"train": ["a", "b"], "test": ["a"]}, "hold different classes"),
    ({"train": ["a", "b"], "val": ["a", "c"]}, "train/ and val/ in"),
])
def test_bad_image_folders_are_one_line_errors(tmp_path, layout, message):
    _folder(tmp_path, layout)
    with pytest.raises(DataError, match=message) as err:
        load_dataset("imagefolder", str(tmp_path))
    assert "\n" not in str(err.value)


def test_an_empty_class_folder_is_named(tmp_path):
    _folder(tmp_path, {"train": ["a"], "test": ["a"]})
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "test" / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/empty holds no images"):
        load_dataset("imagefolder", str(tmp_path))


def test_missing_torchvision_sets_say_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 not found .* pass --download"):
        load_dataset("cifar10", str(tmp_path))


# ---------------------------------------------------------------- augmentation

def _images(n=6, size=12, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ours, theirs, low, high", [
    (A.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (A.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (A.adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
    (A.adjust_hue, TF.adjust_hue, -0.4, 0.4),
])
def test_colour_ops_match_torchvision(ours, theirs, low, high):
    x = _images()
    factors = torch.linspace(low, high, x.shape[0])
    want = torch.stack([theirs(img, float(f)) for img, f in zip(x, factors)])
    torch.testing.assert_close(ours(x, factors), want, atol=2e-6, rtol=0)


def test_the_gpu_colour_jitter_gives_the_cpu_values_without_picking_rows():
    x = _images(16, 8)
    factors, order = A.jitter_params(16, (0.4, 0.4, 0.4, 0.4), torch.Generator().manual_seed(0))
    assert len({tuple(o) for o in order.tolist()}) > 4                  # many different op orders
    picked = A.color_jitter(x, factors, order)                          # CPU: rows picked per op
    torch.testing.assert_close(A.color_jitter_masked(x, factors, order), picked, atol=0, rtol=0)


def test_grayscale_matches_torchvision():
    x = _images()
    torch.testing.assert_close(A.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_crop_resize_flip_geometry():
    x = _images(size=16)
    whole = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 6)
    no, yes = torch.zeros(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(A.crop_resize_flip(x, whole, no, 16), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(A.crop_resize_flip(x, whole, yes, 16), x.flip(-1), atol=1e-6, rtol=0)
    # A crop, upsampled x2: inside the border it is torchvision's bilinear resized crop (at the
    # border we interpolate with the pixel just outside the box where torchvision clamps).
    box = torch.tensor([[2.0, 4.0, 8.0, 8.0]] * 6)
    ours = A.crop_resize_flip(x, box, no, 16)
    theirs = TF.resized_crop(x, 2, 4, 8, 8, [16, 16], antialias=False)
    torch.testing.assert_close(ours[..., 1:-1, 1:-1], theirs[..., 1:-1, 1:-1], atol=1e-6, rtol=0)


def test_crop_boxes_follow_torchvision_rules():
    g = torch.Generator().manual_seed(0)
    boxes = A.resized_crop_boxes(2000, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), g)
    top, left, h, w = boxes.unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 32)).all())
    assert torch.equal(boxes, boxes.round())
    area = h * w / 1024
    # area fraction in scale = (0.2, 1), up to the rounding of h and w to whole pixels
    assert float(area.min()) >= 0.17 and float(area.max()) <= 1.0
    # No try can fit: scale > 1 -> the whole image (torchvision's central-crop fallback).
    full = A.resized_crop_boxes(3, 32, 32, (5.0, 6.0), (1.0, 1.0), g)
    assert full.tolist() == [[0.0, 0.0, 32.0, 32.0]] * 3


def test_augment_is_reproducible_from_its_generator():
    spec = A.AugmentSpec(size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = (_images(16, 8) * 255).to(torch.uint8)
    one = A.augment(x, spec, torch.Generator().manual_seed(1))
    two = A.augment(x, spec, torch.Generator().manual_seed(1))
    other = A.augment(x, spec, torch.Generator().manual_seed(2))
    assert one.shape == (16, 3, 8, 8) and one.dtype == torch.float32
    assert torch.equal(one, two) and not torch.equal(one, other)
    g = torch.Generator().manual_seed(1)
    A.augment(x, spec, g)
    # A fixed number of draws per call: the generator state after a call depends only on B.
    h = torch.Generator().manual_seed(1)
    A.augment(torch.zeros_like(x), spec, h)
    assert torch.equal(g.get_state(), h.get_state())


def test_a_rank_augments_its_share_of_a_global_batch_as_one_process_does():
    spec = A.AugmentSpec(size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = (_images(12, 8) * 255).to(torch.uint8)
    whole_gen = torch.Generator().manual_seed(3)
    whole = A.augment(x, spec, whole_gen)
    for world_size in (2, 3, 4):
        for rank in range(world_size):
            gen = torch.Generator().manual_seed(3)
            share = A.augment(x[rank::world_size], spec, gen, rank=rank, world_size=world_size)
            assert torch.equal(share, whole[rank::world_size])
            # and the generator moves on exactly as the one-process run's does
            assert torch.equal(gen.get_state(), whole_gen.get_state())


def test_prepare_eval_only_normalises_at_native_size():
    spec = A.AugmentSpec(size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    assert torch.equal(A.prepare_eval(x, spec), torch.full((1, 3, 8, 8), 2.0))


# ---------------------------------------------------------------- sharding

def test_one_rank_sees_the_epoch_permutation():
    perm = epoch_permutation(10, seed=0, round=1, epoch=2)
    assert sorted(perm.tolist()) == list(range(10))
    assert torch.equal(torch.cat(epoch_batches(10, 0, 1, 2, rank=0, world_size=1, global_batch=4)), perm)
    assert torch.equal(perm, epoch_permutation(10, 0, 1, 2))
    assert not torch.equal(perm, epoch_permutation(10, 0, 1, 3))
    assert not torch.equal(perm, epoch_permutation(10, 0, 2, 2))


def test_ranks_split_the_padded_permutation_like_distributed_sampler():
    perm = epoch_permutation(10, 0, 0, 0)
    padded = torch.cat([perm, perm[:2]])                  # 10 -> 12, a multiple of W = 4
    shards = [torch.cat(epoch_batches(10, 0, 0, 0, rank=r, world_size=4, global_batch=4)) for r in range(4)]
    assert [len(s) for s in shards] == [3, 3, 3, 3]
    for r in range(4):
        assert torch.equal(shards[r], padded[r::4])
    assert sorted(torch.cat(shards).tolist()) == sorted(padded.tolist())


def test_global_batches_are_full_and_a_small_remainder_joins_the_last():
    assert global_batch_bounds(1500, 128) == [i * 128 for i in range(12)] + [1500]     # 92 >= 64: own batch
    assert global_batch_bounds(1537, 128)[-2:] == [1408, 1537]                         # 1 < 64: joins
    assert global_batch_bounds(10, 4) == [0, 4, 8, 10]
    assert global_batch_bounds(10, 4, world_size=2) == [0, 4, 10]                      # 2 images = 1 per rank
    assert global_batch_bounds(3, 4) == [0, 3]


def test_ranks_share_each_global_batch_of_the_one_process_run():
    one = epoch_batches(1500, 0, 0, 0, 0, 1, 128)
    assert [len(b) for b in one] == [128] * 11 + [92]
    assert torch.equal(torch.cat(one), epoch_permutation(1500, 0, 0, 0))
    for world_size in (2, 4):
        per_rank = [epoch_batches(1500, 0, 0, 0, r, world_size, 128) for r in range(world_size)]
        assert all(len(b) == len(one) for b in per_rank)
        for step, batch in enumerate(one):
            shares = [per_rank[r][step] for r in range(world_size)]
            assert {len(s) for s in shares} == {len(batch) // world_size}
            for r in range(world_size):                 # rank r holds positions r, r + W, ...
                assert torch.equal(shares[r], batch[r::world_size])
    odd = [epoch_batches(1501, 0, 0, 0, r, 2, 128) for r in range(2)]   # padded by one repeat
    assert [len(b) for b in odd[0]] == [len(b) for b in odd[1]] == [64] * 11 + [47]

def test_an_image_folder_takes_val_as_its_test_split_and_says_so(tmp_path):
    _folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]}, count=2)
    data = load_dataset("imagefolder", str(tmp_path))
    assert data.has_test and data.test.labels.tolist() == [0, 0, 1, 1]
    assert data.test.images[2, :, 0, 0].tolist() == [40, 40, 40]            # val/dog/0.png
    assert data.notes == [f"test split: {tmp_path / 'val'}/"]


def test_test_is_preferred_to_val_and_a_folder_without_either_has_an_empty_test_split(tmp_path):
    _folder(tmp_path / "both", {"train": ["a"], "test": ["a"], "val": ["a"]}, count=1)
    assert load_dataset("imagefolder", str(tmp_path / "both")).notes == [f"test split: {tmp_path / 'both' / 'test'}/"]
    _folder(tmp_path / "none", {"train": ["a", "b"]}, count=2)
    for size in (None, 72):                      # decoded into memory, and streamed
        data = load_dataset("imagefolder", str(tmp_path / "none"), image_size=size, workers=0)
        assert not data.has_test and len(data.test) == 0 and len(data.train) == 4
        assert data.notes == [f"no test/ or val/ folder in {tmp_path / 'none'}: training without kNN evaluation"]
        assert list(data.eval_batches("test", 8)) == []

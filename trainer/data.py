"""Datasets: images, labels and the sample index that addresses the memory bank.

Two ways to hold a dataset, one interface (:class:`ImageDataset`):

- in memory (digits, synthetic, CIFAR-10/100, SVHN, small-image folders such as the CIFAR-10
  JPEG copy): uint8 tensors (N, 3, S, S). A training batch is indexed out, moved to the device
  and augmented there by :mod:`trainer.augment` (batched tensor ops seeded from a
  torch.Generator: reproducible, resumable, and on the GPU when the batch is).
- streamed (large-image folders: ImageNet, CUB-200, Stanford Dogs): file paths; a DataLoader
  decodes and augments with the equivalent torchvision transforms in worker processes.

:meth:`ImageDataset.instance_dataset` gives the torch ``Dataset`` view that returns
(image, label, index). Labels are never used for training: only for kNN evaluation and for the
neighbourhood-consistency report.

``digits`` is scikit-learn's UCI optical digits (1,797 8x8 grey images; no download): a fixed
permutation (RandomState(0)) gives 1,500 train / 297 test. The images stay at their native 8x8
(repeated to 3 channels) and the augmentation is sized to them (RandomResizedCrop(8, ...)).
Why not upsample to 32x32: upsampling adds no information (a crop of the 32-px copy is a crop
of the 8-px image, interpolated), while it costs 16x the pixels, so the same minutes buy
several times fewer epochs. The epochs matter: a memory bank row is refreshed once per epoch
(12 steps at batch 128), and at a few-minute budget the 32-px version stays near the collapsed
uniform solution (loss ~ log N) in this project and in the minimal reference alike (measured
figures: README, "Accuracy against a minimal reference"). Every backbone accepts 8-px inputs (CIFAR
stems; the AlexNet variant pools adaptively).
"""
from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from trainer.augment import AugmentSpec, augment, prepare_eval
from trainer.errors import TrainerError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Image folders whose images are at most this many pixels a side are decoded into memory.
IN_MEMORY_MAX_SIZE = 64
LARGE_IMAGE_SIZE = 224
# The authors' per-channel statistics for CIFAR; other in-memory sets use their own train
# statistics, streamed folders ImageNet's.
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
CIFAR100_STATS = ((0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class DataError(TrainerError):
    """A dataset that cannot be found or read as asked."""


@dataclass
class Split:
    """One split: labels (N,) int64 and either images (N, 3, S, S) uint8 or image file paths."""
    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ImageDataset:
    name: str
    dataset_id: str          # identifies the training set in the store (name, N, source)
    train: Split
    test: Split
    classes: list[str]
    image_size: int          # side S of the images the model sees
    mean: tuple
    std: tuple
    hflip: bool = False
    workers: int = 4
    notes: list[str] = field(default_factory=list)   # what a run should say about the data (the test split used)

    @property
    def has_test(self) -> bool:
        """False for an image folder without test/ or val/: nothing to evaluate kNN on."""
        return len(self.test) > 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_memory(self) -> bool:
        return self.train.images is not None

    @property
    def augment_spec(self) -> AugmentSpec:
        return AugmentSpec(size=self.image_size, mean=self.mean, std=self.std, hflip=self.hflip)

    def stage(self, device: torch.device) -> None:
        """Move in-memory images (uint8) to ``device`` once, so that batches are indexed and
        augmented there without a host-to-device copy per step (CIFAR-10: 150 MiB)."""
        for split in (self.train, self.test):
            if split.images is not None:
                split.images = split.images.to(device)
                split.labels = split.labels.to(device)

    def split(self, name: str) -> Split:
        return {"train": self.train, "test": self.test}[name]

    def train_batches(self, batches: list[torch.Tensor], generator: torch.Generator, device: torch.device,
                      rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Augmented training batches: (images (b, 3, S, S) float32 on ``device``, indices (b,) int64
        on ``device``) for each index tensor in ``batches``. Randomness comes from ``generator``.

        In-memory sets: ``batches`` are rank ``rank``'s shares of global batches
        (``trainer.sharding``) and ``generator`` is seeded the same on every rank, so each image
        is augmented as in a one-process run (``trainer.augment.augment``). Streamed folders:
        torchvision transforms in DataLoader workers; pass a per-rank ``generator`` there.
        """
        if self.in_memory:
            spec = self.augment_spec
            for idx in batches:
                # non_blocking: a blocking copy to a GPU would wait for the previous step to finish
                idx = idx.to(self.train.images.device, non_blocking=True)
                images = self.train.images.index_select(0, idx).to(device, non_blocking=True)
                yield augment(images, spec, generator, rank, world_size), idx.to(device, non_blocking=True)
            return
        loader = torch.utils.data.DataLoader(
            self.instance_dataset("train", train=True), batch_sampler=[b.tolist() for b in batches],
            num_workers=self.workers, generator=generator, pin_memory=device.type == "cuda",
            persistent_workers=False)
        if self.workers == 0:
            # torchvision transforms draw from torch's global RNG in the main process.
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        for images, _, idx in _one_line_worker_errors(loader):
            yield images.to(device, non_blocking=True), idx.to(device)

    def eval_batches(self, split: str, batch_size: int, start: int = 0,
                     stop: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Unaugmented (images (b, 3, S, S) float32 normalised, labels (b,)) of rows start..stop
        of ``split`` in order (CPU tensors; the caller moves them)."""
        data = self.split(split)
        stop = len(data) if stop is None else stop
        if self.in_memory:
            spec = self.augment_spec
            for s in range(start, stop, batch_size):
                e = min(stop, s + batch_size)
                yield prepare_eval(data.images[s:e], spec), data.labels[s:e]
            return
        subset = torch.utils.data.Subset(self.instance_dataset(split, train=False), range(start, stop))
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=self.workers)
        for images, labels, _ in _one_line_worker_errors(loader):
            yield images, labels

    def instance_dataset(self, split: str, train: bool) -> torch.utils.data.Dataset:
        """torch Dataset of (image, label, index): uint8 (3, S, S) for in-memory sets (augment
        batches with trainer.augment), a transformed float tensor for streamed folders."""
        data = self.split(split)
        if data.images is not None:
            return _TensorInstances(data)
        return _FileInstances(data, folder_transform(self.image_size, self.mean, self.std, train, self.hflip))


class _TensorInstances(torch.utils.data.Dataset):
    def __init__(self, split: Split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        return self.split.images[index], int(self.split.labels[index]), index


class _FileInstances(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        with open_image(self.split.files[index]) as img:
            image = self.transform(img.convert("RGB"))
        return image, int(self.split.labels[index]), index


def _one_line_worker_errors(loader) -> Iterator:
    """The batches of a DataLoader. A DataError raised in one of its worker processes comes back
    re-raised with the worker's traceback inside its message: keep the message's own line."""
    try:
        yield from loader
    except DataError as err:
        lines = str(err).strip().splitlines()
        raise DataError(lines[-1].split("DataError: ", 1)[-1] if lines else "a DataLoader worker failed") from None


@contextmanager
def open_image(path: str) -> Iterator:
    """``PIL.Image.open(path)`` for a with-block that reads it; what goes wrong there is one
    DataError naming the file: a file PIL cannot identify or decode (truncated, not an image), and
    a decompression bomb, an image of more than PIL.Image.MAX_IMAGE_PIXELS pixels (PIL only warns
    up to twice that, and decoding it costs 3 bytes a pixel per worker: refused as well)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                yield img
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise DataError(f"image {path} is too large to decode safely ({' '.join(str(err).split())}); "
                            f"PIL's limit, PIL.Image.MAX_IMAGE_PIXELS, is {Image.MAX_IMAGE_PIXELS} pixels: "
                            f"shrink or remove the image") from None
        except OSError as err:   # PIL.UnidentifiedImageError, a truncated file, a read error
            raise DataError(f"cannot decode image {path}: {' '.join(str(err).split())}") from None


def folder_transform(size: int, mean, std, train: bool, hflip: bool = False):
    """torchvision transforms for streamed images: the paper's augmentation for training,
    resize (size * 256 / 224) + centre crop for evaluation."""
    from torchvision import transforms as T

    if train:
        ops = [T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomGrayscale(0.2)]
        if hflip:
            ops.append(T.RandomHorizontalFlip())
    else:
        ops = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])


# --------------------------------------------------------------------------- loaders


def channel_stats(images: torch.Tensor) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 images (N, 3, H, W) scaled to [0, 1]."""
    x = images.float().div_(255.0).transpose(0, 1).reshape(3, -1)
    return tuple(round(v, 4) for v in x.mean(1).tolist()), tuple(round(v, 4) for v in x.std(1).tolist())


def _grey_to_uint8_rgb(gray: np.ndarray, vmax: float) -> torch.Tensor:
    """(N, h, w) grey in [0, vmax] -> (N, 3, h, w) uint8."""
    x = torch.from_numpy(gray.astype(np.float32) / vmax).clamp_(0, 1)
    return (x * 255).round_().to(torch.uint8).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def load_digits() -> tuple[Split, Split, list[str]]:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    order = np.random.RandomState(0).permutation(len(bunch.target))
    images = _grey_to_uint8_rgb(bunch.images[order], 16.0)
    labels = torch.from_numpy(bunch.target[order].astype(np.int64))
    return (Split(labels[:1500], images[:1500]), Split(labels[1500:], images[1500:]),
            [str(c) for c in range(10)])


def load_synthetic(n_train: int = 400, n_test: int = 100, classes: int = 10) -> tuple[Split, Split, list[str]]:
    """A deterministic, learnable toy set for tests: each class is a smooth random colour
    pattern (4x4 upsampled to 32x32); a sample is its class pattern, shifted by up to 4 pixels,
    with a random brightness and Gaussian noise. Fixed seed: identical everywhere."""
    g = torch.Generator().manual_seed(20190609)
    protos = F.interpolate(torch.rand(classes, 3, 4, 4, generator=g), size=(40, 40), mode="bilinear",
                           align_corners=False)

    def make(n):
        labels = torch.arange(n) % classes
        shift = torch.randint(0, 9, (n, 2), generator=g)
        crops = torch.stack([protos[c, :, y:y + 32, x:x + 32] for c, (y, x) in zip(labels.tolist(), shift.tolist())])
        bright = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
        noisy = crops * bright + 0.08 * torch.randn(crops.shape, generator=g)
        return Split(labels, (noisy.clamp(0, 1) * 255).round().to(torch.uint8))

    return make(n_train), make(n_test), [f"class{c}" for c in range(classes)]


def _torchvision_set(cls, name: str, root: str, download: bool, **kwargs):
    try:
        return cls(root=root, download=download, **kwargs)
    except RuntimeError as err:
        if download:
            raise DataError(f"{name} under {root} is not readable after download: {str(err).splitlines()[0]}") from None
        raise DataError(f"{name} not found under {root}: pass --download (needs network) or use "
                        f"--dataset imagefolder with a train/ test/ folder copy") from None
    except OSError as err:  # network failures while downloading
        raise DataError(f"downloading {name} to {root} failed ({type(err).__name__}: {err}); "
                        f"download it elsewhere and point --data-root at it") from None


def load_cifar(root: str, which: int, download: bool) -> tuple[Split, Split, list[str]]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if which == 10 else datasets.CIFAR100
    parts = [_torchvision_set(cls, f"CIFAR-{which}", root, download, train=t) for t in (True, False)]
    splits = [Split(torch.tensor(p.targets, dtype=torch.int64),
                    torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous()) for p in parts]
    return splits[0], splits[1], list(parts[0].classes)


def load_svhn(root: str, download: bool) -> tuple[Split, Split, list[str]]:
    from torchvision import datasets

    parts = [_torchvision_set(datasets.SVHN, "SVHN", root, download, split=s) for s in ("train", "test")]
    splits = [Split(torch.from_numpy(p.labels.astype(np.int64)), torch.from_numpy(p.data).contiguous()) for p in parts]
    return splits[0], splits[1], [str(c) for c in range(10)]


# The held-out split of an image folder, in the order looked for: test/, or val/ (the ImageNet layout).
TEST_SPLIT_NAMES = ("test", "val")


def list_class_images(split_dir: str, classes: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """(classes, files, labels) of ``split_dir/<class>/<image>``: classes are the sorted
    sub-folders (label order), or ``classes`` as given, which the sub-folders must match."""
    names = sorted(name for name, _, is_dir, _ in _folder_entries(split_dir) if is_dir)
    if not names:
        raise DataError(f"{split_dir} has no class folders: put each class's images in {split_dir}/<class>/")
    if classes is not None and names != classes:
        extra = sorted(set(names) ^ set(classes))
        raise DataError(f"train/ and {os.path.basename(split_dir)}/ in {os.path.dirname(split_dir)} hold "
                        f"different classes (e.g. {extra[0]!r})")
    files, labels = [], []
    for label, name in enumerate(names):
        images = image_files(os.path.join(split_dir, name))
        if not images:
            raise DataError(f"class folder {os.path.join(split_dir, name)} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
        files.extend(images)
        labels.extend([label] * len(images))
    return names, files, labels


def image_files(folder: str) -> list[str]:
    """The image files directly inside ``folder``, sorted by path."""
    return sorted(path for name, path, _, is_file in _folder_entries(folder)
                  if is_file and name.lower().endswith(IMAGE_EXTENSIONS))


def _folder_entries(folder: str) -> list[tuple[str, str, bool, bool]]:
    """(name, path, is a directory, is a file) of each entry of ``folder``, symbolic links
    followed. A folder or entry that cannot be read (no permission; a link that leads back to
    itself, ELOOP) is one DataError naming it, instead of a traceback from the scan."""
    try:
        with os.scandir(folder) as entries:
            return [(e.name, e.path, e.is_dir(), e.is_file()) for e in entries]
    except OSError as err:
        where = err.filename or folder
        loop = " (a symbolic link loop: the link leads back to itself)" if err.errno == errno.ELOOP else ""
        raise DataError(f"cannot read {where}: {err.strerror or err}{loop}: fix or remove it") from None


def held_out_folder(root: str) -> str | None:
    """The name of ``root``'s held-out split folder (test, else val), or None."""
    return next((name for name in TEST_SPLIT_NAMES if os.path.isdir(os.path.join(root, name))), None)


def test_split_note(root: str) -> str:
    """What a run says about the image folder's test split."""
    held_out = held_out_folder(root)
    if held_out is None:
        return f"no test/ or val/ folder in {root}: training without kNN evaluation"
    return f"test split: {os.path.join(root, held_out)}/"


def scan_image_folder(root: str) -> tuple[list[str], dict[str, tuple[list[str], list[int]]]]:
    """Validate DIR/train/<class>/ and the held-out DIR/test/<class>/ (or DIR/val/<class>/) and
    list them: (classes, {"train": (files, labels), "test": (files, labels)}).

    Classes are the sorted sub-folders of train/ (label order); the held-out split must hold the
    same classes. Without one, its (files, labels) are empty: the run trains without kNN evaluation.
    """
    if not os.path.isdir(root):
        raise DataError(f"--data-root {root} is not a directory")
    if not os.path.isdir(os.path.join(root, "train")):
        raise DataError(f"--data-root {root} has no train/ folder: imagefolder needs {root}/train/<class>/ "
                        f"(and {root}/test/<class>/ or {root}/val/<class>/ for kNN evaluation)")
    classes, files, labels = list_class_images(os.path.join(root, "train"))
    found = {"train": (files, labels), "test": ([], [])}
    held_out = held_out_folder(root)
    if held_out is not None:
        _, files, labels = list_class_images(os.path.join(root, held_out), classes)
        found["test"] = (files, labels)
    return classes, found


def square_rgb(img, size: int) -> np.ndarray:
    """A PIL image as (size, size, 3) uint8 RGB, resized bilinearly when it is not that size."""
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.array(img, dtype=np.uint8)   # a writable copy (np.asarray of a PIL image is read-only)


def _decode_square(path: str, size: int) -> np.ndarray:
    with open_image(path) as img:
        return square_rgb(img, size)


def load_image_folder(root: str, image_size: int | None) -> tuple[Split, Split, list[str], int]:
    """Image folder: decoded into memory when its images are small (side <= 64, or --image-size
    <= 64: each image resized to image_size x image_size), streamed from disk otherwise. Without
    a test/ or val/ folder the test split is empty."""
    classes, found = scan_image_folder(root)
    if image_size is None:
        with open_image(found["train"][0][0]) as first:
            side = max(first.size)
        image_size = side if side <= IN_MEMORY_MAX_SIZE else LARGE_IMAGE_SIZE
    splits = []
    for split in ("train", "test"):
        files, labels = found[split]
        label_tensor = torch.tensor(labels, dtype=torch.int64)
        if image_size <= IN_MEMORY_MAX_SIZE:
            arrays = [_decode_square(f, image_size) for f in files]
            images = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() if arrays
                      else torch.empty((0, 3, image_size, image_size), dtype=torch.uint8))
            splits.append(Split(label_tensor, images))
        else:
            splits.append(Split(label_tensor, files=files))
    return splits[0], splits[1], classes, image_size


def load_dataset(name: str, data_root: str | None = None, download: bool = False, image_size: int | None = None,
                 hflip: bool = False, workers: int = 4) -> ImageDataset:
    """Load a dataset by name (see module docstring). Raises DataError (one line) when it cannot."""
    stats = None
    if name == "digits":
        train, test, classes = load_digits()
        size, source = 8, "sklearn"
    elif name == "synthetic":
        train, test, classes = load_synthetic()
        size, source = 32, "builtin"
    elif name in ("cifar10", "cifar100"):
        which = 10 if name == "cifar10" else 100
        train, test, classes = load_cifar(data_root, which, download)
        size, source = 32, "torchvision"
        stats = CIFAR10_STATS if which == 10 else CIFAR100_STATS
    elif name == "svhn":
        train, test, classes = load_svhn(data_root, download)
        size, source = 32, "torchvision"
    elif name == "imagefolder":
        train, test, classes, size = load_image_folder(data_root, image_size)
        source = os.path.abspath(data_root)
    else:
        raise DataError(f"unknown dataset {name!r}")
    if image_size is not None and name != "imagefolder" and image_size != size:
        raise DataError(f"--dataset {name} has {size}x{size} images; image_size {image_size} is only "
                        f"supported for imagefolder")
    if stats is None:
        stats = channel_stats(train.images) if train.images is not None else IMAGENET_STATS
    dataset_id = f"{name}:{source}:n={len(train)}:size={size}"
    notes = [test_split_note(data_root)] if name == "imagefolder" else []
    return ImageDataset(name=name, dataset_id=dataset_id, train=train, test=test, classes=classes,
                        image_size=size, mean=stats[0], std=stats[1], hflip=hflip, workers=workers,
                        notes=notes)

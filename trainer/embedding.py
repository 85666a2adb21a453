"""A trained model on new images: ``trainer.load_model``, ``trainer.embed`` and ``trainer embed``.

Images reach the model as the run's own evaluation prepared them (:class:`InputSpec`): a model
trained on images of at most 64 px (digits, CIFAR, small-image folders) sees every image resized
bilinearly to S x S; one trained on larger images sees it resized to S * 256 / 224 and centre-
cropped to S. Then the run's per-channel normalisation. Features come out as the memory bank
holds them: (B, dim) float32 rows of unit L2 norm (or, with ``head=False``, the (B, F) backbone
features the linear probe uses).

``trainer embed`` embeds a dataset split or a folder of images (class sub-folders give labels;
a flat folder of images has none) in batches, so memory is bounded by a batch whatever N is, and
writes either ``FILE.npy`` ((N, dim) float32, with ``FILE.labels.npy`` and, for folders,
``FILE.files.txt`` beside it) or a store holding ``features/round-R`` (and labels), which
``nbr-index rebuild`` / ``nbr-index query`` read.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trainer.augment import AugmentSpec, normalize, prepare_eval, to_float
from trainer.data import (IMAGE_EXTENSIONS, IN_MEMORY_MAX_SIZE, TEST_SPLIT_NAMES, DataError, folder_transform, image_files,
                          list_class_images, load_dataset, square_rgb, open_image)
from trainer.errors import TrainerError
from trainer.export import read_trained
from trainer.knn import iter_embed
from trainer.models import EmbeddingModel, build_model
from trainer.progress import Progress


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes a model input of a run: side S, per-channel mean and std."""
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def resized_and_cropped(self) -> bool:
        """Large images (S > 64): resize to S * 256 / 224, centre crop S; small ones: resize to S x S."""
        return self.image_size > IN_MEMORY_MAX_SIZE

    @property
    def augment_spec(self) -> AugmentSpec:
        return AugmentSpec(size=self.image_size, mean=self.mean, std=self.std)

    def image_transform(self) -> Callable:
        """PIL image -> (3, S, S) float32 normalised, as the run's image folders were evaluated."""
        if self.resized_and_cropped:
            return folder_transform(self.image_size, self.mean, self.std, train=False)

        def small(img) -> torch.Tensor:
            pixels = torch.from_numpy(square_rgb(img, self.image_size)).permute(2, 0, 1)
            return normalize(to_float(pixels.unsqueeze(0)), self.mean, self.std)[0]
        return small


def load_model(source: str, device: str | torch.device = "cpu") -> EmbeddingModel:
    """The trained model of ``source`` (a run directory, its checkpoint.pt, or a full ``trainer
    export`` file), in eval mode on ``device``: images (B, 3, S, S) -> (B, dim) unit rows.
    ``model.input_spec`` says how to prepare images for it (``embed`` does)."""
    from nbr_index.checks import resolve_device

    resolve_device(device)
    weights, config = read_trained(source)
    model = build_model(config["arch"], config["image_size"], config["dim"])
    model.load_state_dict(weights)
    model.input_spec = InputSpec(int(config["image_size"]), tuple(config["mean"]), tuple(config["std"]))
    return model.to(device).eval()


def embed(model: EmbeddingModel, images, *, batch_size: int = 256, head: bool = True) -> torch.Tensor:
    """Features of ``images`` from a model of :func:`load_model`, on the model's device.

    images: a tensor (B, 3, H, W), uint8 or float in [0, 1] (resized to S x S when H, W != S),
    or a sequence of image file paths or PIL images (prepared as the run's image folders were).
    Returns (B, dim) float32 L2-normalised rows, or with ``head=False`` the (B, F) backbone
    features. Runs ``batch_size`` images at a time in eval mode, without gradients.
    """
    spec = getattr(model, "input_spec", None)
    if spec is None:
        raise TrainerError("embed needs a model from trainer.load_model (it knows the run's input size and "
                           "normalisation)")
    device = next(model.parameters()).device
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise TrainerError(f"images must be a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
        batches = ((prepare_eval(images[s:s + batch_size], spec.augment_spec), torch.zeros(0))
                   for s in range(0, images.shape[0], batch_size))
    else:
        batches = _image_batches(ImageSamples(list(images), None, spec), batch_size, workers=0)
    chunks = [features for features, _ in iter_embed(model, batches, device, head=head)]
    if not chunks:
        width = model.head.out_features if head else model.feature_dim
        return torch.empty((0, width), device=device)
    return torch.cat(chunks)


# --------------------------------------------------------------------------- what to embed


class ImageSamples(torch.utils.data.Dataset):
    """Image files or PIL images -> ((3, S, S) float32 normalised, label); label -1 without labels."""

    def __init__(self, items: Sequence, labels: Sequence[int] | None, spec: InputSpec):
        self.items, self.labels, self.transform = items, labels, spec.image_transform()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        label = -1 if self.labels is None else int(self.labels[index])
        if isinstance(item, (str, os.PathLike)):
            with open_image(str(item)) as img:   # undecodable files and decompression bombs: one line
                return self.transform(img), label
        return self.transform(item), label


def _image_batches(samples: ImageSamples, batch_size: int, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loader = torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=False, num_workers=workers)
    try:
        yield from loader
    except DataError as err:
        # From a worker process torch re-raises it with the worker's traceback in the message;
        # its last line is "trainer.data.DataError: <the message>".
        raise DataError(str(err).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


@dataclass
class EmbedSource:
    """What ``trainer embed`` embeds: N images in a fixed order, labels (N,) int64 where known."""
    description: str                 # for messages: "digits (train)", "folder /data/x (10 classes)"
    dataset_id: str                  # the id of the store it is written to
    n: int
    labels: np.ndarray | None
    files: list[str] | None          # image files in row order (folders)
    batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]   # batch_size -> (images, labels)


def embed_source(dataset: str | None, data_root: str | None, split: str | None, spec: InputSpec,
                 workers: int = 4) -> EmbedSource:
    """The images of ``--dataset`` (its ``split``, default train) or of the folder ``--data-root``
    (its sub-folder ``split`` when given; test falls back to val/). One-line errors otherwise."""
    if split is not None and split not in ("train", "test"):
        raise TrainerError(f"--split must be train or test, got {split!r}")
    if dataset is not None and dataset != "imagefolder":
        return _dataset_source(dataset, data_root, split or "train", spec)
    if data_root is None:
        raise TrainerError("--dataset imagefolder needs --data-root" if dataset
                           else "give --dataset NAME or --data-root FOLDER: what to embed")
    if dataset == "imagefolder" and split is None:
        split = "train"
    folder = data_root if split is None else _split_folder(data_root, split)
    return _folder_source(folder, spec, workers)


def _dataset_source(name: str, data_root: str | None, split: str, spec: InputSpec) -> EmbedSource:
    data = load_dataset(name, data_root)
    part = data.split(split)
    if len(part) == 0:
        raise TrainerError(f"{name} has no {split} split to embed")

    def batches(batch_size: int):
        for start in range(0, len(part), batch_size):
            yield prepare_eval(part.images[start:start + batch_size], spec.augment_spec), part.labels[start:start + batch_size]
    return EmbedSource(f"{name} ({split})", f"embed:{data.dataset_id}:{split}", len(part),
                       part.labels.numpy().astype(np.int64), None, batches)


def _split_folder(root: str, split: str) -> str:
    names = (split,) if split == "train" else TEST_SPLIT_NAMES
    for name in names:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise DataError(f"--data-root {root} has no {' or '.join(n + '/' for n in names)} folder for --split {split}")


def _folder_source(folder: str, spec: InputSpec, workers: int) -> EmbedSource:
    """A folder of class sub-folders (labels: sorted class names) or a flat folder of images."""
    if not os.path.isdir(folder):
        raise DataError(f"--data-root {folder} is not a directory")
    flat = image_files(folder)
    has_subfolders = any(e.is_dir() for e in os.scandir(folder))
    if flat and has_subfolders:
        raise DataError(f"{folder} holds both images and sub-folders: point --data-root at a flat folder "
                        f"of images or at one whose sub-folders are classes")
    if flat:
        files, labels, what = flat, None, "no classes"
    elif has_subfolders:
        classes, files, label_list = list_class_images(folder)
        labels, what = np.asarray(label_list, dtype=np.int64), f"{len(classes)} classes"
    else:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) and no class folders")
    samples = ImageSamples(files, labels, spec)
    source_id = f"folder:{os.path.abspath(folder)}:n={len(files)}:size={spec.image_size}"
    return EmbedSource(f"folder {folder} ({len(files)} images, {what})", f"embed:{source_id}", len(files),
                       labels, files, lambda batch_size: _image_batches(samples, batch_size, workers))


# --------------------------------------------------------------------------- where it goes


def is_npy_path(out: str) -> bool:
    return out.endswith(".npy")


def npy_outputs(out: str) -> tuple[str, str, str]:
    """FILE.npy -> (FILE.npy, FILE.labels.npy, FILE.files.txt): features, labels, image paths."""
    stem = out[: -len(".npy")]
    return out, f"{stem}.labels.npy", f"{stem}.files.txt"


def check_output(out: str, n: int, dim: int, dataset_id: str, round: int) -> None:
    """Refuse, before any work, an output that exists (.npy) or a store that cannot take this
    snapshot (another N, dim or image set, or features/round-R already there)."""
    from storage import Store, StoreError

    if is_npy_path(out):
        for path in npy_outputs(out):
            if os.path.exists(path):
                raise TrainerError(f"{path} already exists: remove it or pass another --out")
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise TrainerError(f"the folder of --out {out} does not exist: create {parent} first")
        return
    if round < 0:
        raise TrainerError(f"--round must be 0 or more, got {round}")
    try:
        store = Store.open(out)
    except StoreError:
        if os.path.isdir(out) and os.listdir(out):
            raise TrainerError(f"--out {out} is a directory with other files but no store: use a new path "
                               f"(FILE.npy or a store directory)") from None
        return
    store.check_matches(n, dim, dataset_id)
    if round in store.complete_feature_rounds():
        raise TrainerError(f"store {out} already holds features/round-{round}: pass another --round or --out")


def write_embeddings(model: EmbeddingModel, source: EmbedSource, out: str, *, batch_size: int = 256,
                     round: int = 0, log: Callable[[str], None] = print) -> list[str]:
    """Embed ``source`` batch by batch into ``out`` (.npy or a store, see the module docstring);
    returns the paths/URLs written. Memory: one batch of images plus the (N, dim) rows, which go
    to a memory-mapped file on disk, not to RAM."""
    dim = model.head.out_features
    check_output(out, source.n, dim, source.dataset_id, round)
    log(f"embedding {source.description}: {source.n} images -> {out}")
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out)) if is_npy_path(out) else None,
                                     prefix=".embed-") as scratch:
        rows_path = os.path.join(scratch, "rows.npy")
        rows = np.lib.format.open_memmap(rows_path, mode="w+", dtype=np.float32, shape=(source.n, dim))
        done = 0
        with Progress(-(-source.n // batch_size), "embedding batch", log, unit="batch") as progress:
            for features, _ in iter_embed(model, source.batches(batch_size), device):
                rows[done:done + features.shape[0]] = features.cpu().numpy()
                done += features.shape[0]
                progress.update(1, lambda: f"{done}/{source.n} images")  # noqa: B023 (update calls it at once)
        if done != source.n:
            raise TrainerError(f"embedded {done} images where {source.n} were listed: did the folder change?")
        rows.flush()
        if is_npy_path(out):
            return _publish_npy(rows_path, source, out)
        return _publish_store(rows, source, out, round)


def _publish_npy(rows_path: str, source: EmbedSource, out: str) -> list[str]:
    _, labels_path, files_path = npy_outputs(out)
    written = []
    if source.labels is not None:
        np.save(labels_path, source.labels)
        written.append(labels_path)
    if source.files is not None:
        with open(files_path, "w") as fh:
            fh.writelines(f"{path}\n" for path in source.files)
        written.append(files_path)
    os.replace(rows_path, out)   # last: a complete .npy is never seen half-written
    return [out, *written]


def _publish_store(rows: np.ndarray, source: EmbedSource, out: str, round: int) -> list[str]:
    """features/round-``round`` of the store ``out`` <- rows (N, dim), as the store's one writer for
    the time it takes (storage.lease): a training run writing ``out`` refuses it, and it a run."""
    import uuid

    from storage import Store, take_writer_lease

    writer = f"embed-{uuid.uuid4().hex[:12]}"
    lease = take_writer_lease(out, os.getcwd(), writer)
    try:
        store = Store.create_or_open(out, n=source.n, dim=rows.shape[1], dataset_id=source.dataset_id)
        store.write_as(writer, lease)
        if source.labels is not None and store.read_labels() is None:
            store.write_labels(source.labels)
        store.write_features(round, rows)
    finally:
        lease.release()
    return [f"{store.url} features/round-{round}"]

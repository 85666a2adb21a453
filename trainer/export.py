"""Trained networks out of a run: ``trainer export`` files and reading any trained source.

An export file is ``torch.save`` of a plain dict that ``torch.load(path, weights_only=True)``
reads (tensors, strings, numbers and lists only)::

    state_dict   the weights, in one of two layouts (below)
    config       what the weights need: format "and-nbr-export", version, layout,
                 backbone_only, arch, image_size, dim, feature_dim, small_image_stem, mean and
                 std (the input normalisation, per RGB channel of [0, 1] images), classes,
                 dataset_id, method, round, epoch

Layouts:

- ``and`` (default): ``trainer.models.EmbeddingModel``'s keys (``backbone.*``, ``head.*``); with
  ``backbone_only`` the backbone's own keys (no prefix), for ``build_model(...).backbone``.
- ``torchvision`` (resnet18 / resnet50): the keys of ``torchvision.models.resnet18/50``: the
  backbone's keys as they are (it is a torchvision ResNet) and the 128-d head as ``fc``, so they
  load with ``strict=True`` into ``resnet18(num_classes=dim)`` (its output, L2-normalised, is the
  run's feature), or with ``backbone_only`` into a ResNet whose ``fc`` is ``nn.Identity()``. For
  images of at most 64 px (``small_image_stem``) replace the stem first, as the run did:
  ``conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)``, ``maxpool = Identity()``.

:func:`read_trained` reads a run directory, a ``checkpoint.pt`` or a full export of either layout
as (EmbeddingModel weights, config).
"""
from __future__ import annotations

import os

import torch

from trainer.checkpoint import checkpoint_path, data_facts, load_checkpoint
from trainer.errors import TrainerError
from trainer.models import SMALL_IMAGE_MAX, build_model

EXPORT_FORMAT = "and-nbr-export"
EXPORT_VERSION = 1
LAYOUTS = ("and", "torchvision")
TORCHVISION_ARCHS = ("resnet18", "resnet50")


def read_trained(source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict of the whole EmbeddingModel, config as in an export file) of ``source``: a run
    directory, its checkpoint.pt, or a full (not backbone-only) export file. One-line
    TrainerError when it is none of them."""
    if os.path.isdir(source):
        path = checkpoint_path(source)
        if not os.path.isfile(path):
            raise TrainerError(f"{source} holds no checkpoint.pt: pass the --run-dir of a trained run")
        return _from_checkpoint(load_checkpoint(path))
    if not os.path.isfile(source):
        raise TrainerError(f"{source} does not exist: pass a run directory, its checkpoint.pt or a "
                           f"`trainer export` file")
    try:
        found = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except Exception:   # not weights-only (a checkpoint holds optimizer state) or not torch at all
        found = None
    if isinstance(found, dict) and isinstance(found.get("config"), dict) \
            and found["config"].get("format") == EXPORT_FORMAT:
        config = found["config"]
        if config.get("backbone_only"):
            raise TrainerError(f"{source} is a backbone-only export (no {config.get('dim')}-d head): load it "
                               f"into build_model(...).backbone, or export without --backbone-only")
        weights = found["state_dict"]
        if config.get("layout") == "torchvision":
            weights = from_torchvision_keys(weights)
        return weights, config
    return _from_checkpoint(load_checkpoint(source))


def _from_checkpoint(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    cfg = state["config"]
    facts = state.get("data")
    if facts is None:   # a checkpoint from before `data` was recorded: the dataset says it again
        from trainer.data import load_dataset

        facts = data_facts(load_dataset(cfg["dataset"], cfg["data_root"], False, cfg["image_size"],
                                        cfg["hflip"], 0))
    config = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "layout": "and", "backbone_only": False,
        "arch": cfg["arch"], "image_size": facts["image_size"], "dim": cfg["dim"],
        "feature_dim": int(state["model"]["head.weight"].shape[1]),
        "small_image_stem": facts["image_size"] <= SMALL_IMAGE_MAX,
        "mean": facts["mean"], "std": facts["std"], "classes": facts["classes"],
        "dataset_id": facts["dataset_id"], "method": cfg["method"],
        "round": int(state["round"]), "epoch": int(state["epoch"]),
    }
    return dict(state["model"]), config


def to_torchvision_keys(weights: dict[str, torch.Tensor], backbone_only: bool) -> dict[str, torch.Tensor]:
    """EmbeddingModel keys -> torchvision ResNet keys: ``backbone.X`` -> ``X``, ``head.*`` -> ``fc.*``
    (dropped with ``backbone_only``)."""
    out = {}
    for key, value in weights.items():
        if key.startswith("backbone."):
            out[key[len("backbone."):]] = value
        elif key.startswith("head.") and not backbone_only:
            out["fc." + key[len("head."):]] = value
    return out


def from_torchvision_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_torchvision_keys` for a full export."""
    return {("head." + key[3:] if key.startswith("fc.") else "backbone." + key): value
            for key, value in weights.items()}


def export_model(source: str, out: str, backbone_only: bool = False, layout: str = "and") -> dict:
    """Write the export file ``out`` (see the module docstring) for the trained ``source`` (a run
    directory or checkpoint); returns its config. Bad input: one-line TrainerError, nothing written."""
    if layout not in LAYOUTS:
        raise TrainerError(f"unknown export format {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if os.path.exists(out):
        raise TrainerError(f"{out} already exists: remove it or pass another --out")
    weights, config = read_trained(source)
    if layout == "torchvision" and config["arch"] not in TORCHVISION_ARCHS:
        raise TrainerError(f"--format torchvision is for {' and '.join(TORCHVISION_ARCHS)}; this run's arch is "
                           f"{config['arch']}: use --format and")
    # The weights must build the network they claim to be (a truncated or foreign file fails here).
    build_model(config["arch"], config["image_size"], config["dim"]).load_state_dict(weights)
    if layout == "torchvision":
        weights = to_torchvision_keys(weights, backbone_only)
    elif backbone_only:
        weights = {key[len("backbone."):]: value for key, value in weights.items() if key.startswith("backbone.")}
    config = {**config, "layout": layout, "backbone_only": backbone_only}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    torch.save({"state_dict": {key: value.detach().clone() for key, value in weights.items()}, "config": config}, tmp)
    os.replace(tmp, out)
    return config

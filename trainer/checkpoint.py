"""Checkpoints: everything needed to continue a run to the same result, independent of world size.

``<run_dir>/checkpoint.pt`` (torch.save of a dict, written by rank 0 to a temporary file and
renamed, so a kill never leaves a torn checkpoint):

    format       1
    config       TrainConfig.to_dict()
    round        training round to continue in (0..R)
    epoch        next epoch of that round to train (== epochs_per_round: the round's training is
                 done, its end-of-round work - feature snapshot, kNN - is not)
    model        state_dict of the bare model (never DDP's "module." prefixes)
    optimizer    optimizer state_dict (momentum buffers)
    memory       (N, d) float32 CPU tensor: the memory bank, identical on every rank
    rounds       list of finished-round rows {round, knn_top1, anchors, consistency, seconds}
    history      list of per-epoch rows {round, epoch, loss, lr, images_per_s, seconds[, knn_top1]}
    rng          {"torch": torch.get_rng_state()}; every per-epoch stream (data order,
                 augmentation) is derived from (seed, round, epoch[, rank]), so nothing else is carried
    world_size   world size that wrote it (information only: any world size can resume)
    data         what the model's inputs are (``data_facts``): image_size, mean, std (the
                 normalisation), classes, dataset_id; read by ``trainer export`` and
                 ``trainer.load_model`` (checkpoints written before it existed lack it)
"""
from __future__ import annotations

import os

import torch

from trainer.errors import TrainerError

FORMAT = 1
FILENAME = "checkpoint.pt"


def data_facts(data) -> dict:
    """The ``data`` entry of a checkpoint, from a ``trainer.data.ImageDataset``: what images the
    model was trained on and how they were normalised (plain lists: weights_only-loadable)."""
    return {"image_size": int(data.image_size), "mean": [float(v) for v in data.mean],
            "std": [float(v) for v in data.std], "classes": [str(c) for c in data.classes],
            "dataset_id": data.dataset_id}


def checkpoint_path(run_dir: str) -> str:
    return os.path.join(run_dir, FILENAME)


def save_checkpoint(path: str, state: dict) -> None:
    """Atomically write ``state`` (see module docstring) to ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    if not os.path.isfile(path):
        raise TrainerError(f"no checkpoint at {path}: --resume needs the --run-dir of an earlier run")
    try:
        # mmap: tensors are read when used, so reading only the config (--resume) stays cheap
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
    except Exception as err:  # a torn or foreign file: one line
        raise TrainerError(f"cannot read checkpoint {path}: {type(err).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainerError(f"{path} is not a trainer checkpoint (format {FORMAT})")
    return state

"""Checkpoints: everything needed to continue a run to the same result, independent of world size.

``<run_dir>/checkpoint.pt`` (torch.save of a dict, written by rank 0 to a temporary file,
fsynced and renamed, so neither a kill nor a power loss leaves a torn checkpoint):

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
import pickle

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
    """Atomically and durably write ``state`` (see module docstring) to ``path``: the bytes are
    fsynced before the rename, the rename (the directory) after it, so neither a kill nor a power
    loss leaves a torn or lost checkpoint once this returns."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save({"format": FORMAT, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# What every checkpoint holds (the module docstring); a file without one of these cannot resume.
REQUIRED_KEYS = ("config", "round", "epoch", "model", "optimizer", "memory", "rounds", "history",
                 "round_seconds", "rng")


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at ``path`` as a dict, read with ``weights_only=True``: tensors, numbers,
    strings, lists and dicts only, so a shared checkpoint cannot run code when it is loaded.
    A missing, torn, foreign or code-carrying file, or one without a REQUIRED_KEYS entry, is a
    one-line TrainerError."""
    if not os.path.isfile(path):
        raise TrainerError(f"no checkpoint at {path}: --resume needs the --run-dir of an earlier run")
    try:
        # mmap: tensors are read when used, so reading only the config (--resume) stays cheap
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise TrainerError(f"refusing to load {path}: it holds objects other than tensors, numbers, strings, "
                           f"lists and dicts (loading it could run code); use a checkpoint written by "
                           f"`trainer run`") from None
    except Exception as err:  # a torn or foreign file: one line
        raise TrainerError(f"cannot read checkpoint {path}: {type(err).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainerError(f"{path} is not a trainer checkpoint (format {FORMAT})")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise TrainerError(f"checkpoint {path} lacks {', '.join(missing)}: it was not written by `trainer run` "
                           f"(or is damaged); start a fresh run")
    return state


def restore(state: dict, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            memory: torch.Tensor) -> None:
    """Load a checkpoint's model, optimizer and memory bank (N, d) into this run's, in place; a
    checkpoint whose shapes do not fit them is a one-line TrainerError, before anything changes."""
    saved = tuple(state["memory"].shape)
    if saved != tuple(memory.shape):
        raise TrainerError(f"checkpoint {path} holds a memory bank of {saved[0]} x {saved[1:]} but this run needs "
                           f"{memory.shape[0]} x {memory.shape[1]}: resume with the run's own data and dim")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else type(err).__name__)
        raise TrainerError(f"checkpoint {path} does not fit this run's model ({detail}): "
                           f"resume with the run's own --arch and dim") from None
    memory.copy_(state["memory"].to(memory.device))

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
    snapshot_checksums
                 entry r: the checksum of the features/round-r the run wrote, what its round r + 1
                 must be computed from (``trainer.provenance``; absent: not kept, older checkpoints)
    digests      {where: blake2b-256 hex} of every tensor of the entries above (``memory``,
                 ``model['layer1.0.conv1.weight']``, ``optimizer['state'][0]['momentum_buffer']``,
                 ``rng['torch']``: its dtype, shape and bytes) and, under ``<values>``, of every
                 other value and its place (config, positions, rows), computed at save

Integrity: ``torch.load`` checks nothing (not even the zip entries' CRCs), so ``load_checkpoint``
recomputes every digest and refuses, in one line naming the tensor, a checkpoint whose bytes
changed since it was saved; nothing is restored or trained from it. The cost is one blake2b pass
over the checkpoint at save and at load (blake2b runs at about 0.5 GiB/s on one core: the memory
bank, N x d x 4 bytes, dominates; ImageNet's 1.28M x 128 bank is 0.61 GiB, about 1.3 s). A checkpoint without digests (written
before they existed) is refused too: its bytes cannot be checked, and its store (schema 1) is
refused by storage anyway; continue such a run with the version that wrote it, or train again.

A save that fails (a full disk, an unwritable run dir) is one line, removes its temporary file
and keeps the last good checkpoint; temporary files that a killed save left
(``checkpoint.pt.tmp-<pid>``) are removed at the next start and before every save
(``remove_stale_temp_files``), once the run dir's lock makes this process its only writer.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Iterator, Mapping

import torch

from trainer.errors import TrainerError

FORMAT = 1
FILENAME = "checkpoint.pt"
DIGESTS = "digests"
#: The entry of ``digests`` covering every value that is not a tensor.
VALUES = "<values>"
#: The temporary files of ``save_checkpoint``: ``checkpoint.pt.tmp-<pid>``, nothing else.
_TEMP_NAME = re.compile(re.escape(FILENAME) + r"\.tmp-[0-9]+")


def data_facts(data) -> dict:
    """The ``data`` entry of a checkpoint, from a ``trainer.data.ImageDataset``: what images the
    model was trained on and how they were normalised (plain lists: weights_only-loadable)."""
    return {"image_size": int(data.image_size), "mean": [float(v) for v in data.mean],
            "std": [float(v) for v in data.std], "classes": [str(c) for c in data.classes],
            "dataset_id": data.dataset_id}


def checkpoint_path(run_dir: str) -> str:
    return os.path.join(run_dir, FILENAME)


def save_checkpoint(path: str, state: dict) -> None:
    """Atomically and durably write ``state`` (see module docstring), with the digests of all it
    holds, to ``path``: the bytes are fsynced before the rename, the rename (the directory) after
    it, so neither a kill nor a power loss leaves a torn or lost checkpoint once this returns.
    A failure (full disk, unwritable directory) is a one-line TrainerError that leaves no
    temporary file and the previous checkpoint as it was."""
    full = {"format": FORMAT, **{key: value for key, value in state.items() if key != DIGESTS}}
    full[DIGESTS] = state_digests(full)
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temp_files(directory)   # on a full disk, the space a killed save held is needed now
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(full, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_directory(directory)
    except (OSError, RuntimeError) as err:   # torch's zip writer raises RuntimeError on ENOSPC
        _remove_quietly(tmp)
        raise TrainerError(f"cannot save checkpoint {path} ({_why(err)}): free space on its disk or make "
                           f"--run-dir writable, then continue with --resume (the last saved checkpoint "
                           f"is kept)") from None


def fsync_directory(directory: str) -> None:
    """Make the names in ``directory`` (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(run_dir: str) -> list[str]:
    """Remove the ``checkpoint.pt.tmp-<pid>`` files in ``run_dir`` that a killed or failed save
    left (this process's own included: it is not saving now) and return their names; files of
    any other name are never touched. Call only as the run dir's one live process."""
    try:
        names = [name for name in os.listdir(run_dir) if _TEMP_NAME.fullmatch(name)]
    except OSError:   # no run dir yet, or unreadable: nothing of ours to clean
        return []
    for name in names:
        _remove_quietly(os.path.join(run_dir, name))
    return names


def state_digests(state: dict) -> dict[str, str]:
    """The ``digests`` entry of a checkpoint ``state``: {where: blake2b-256 hex} of every tensor,
    and under VALUES one digest of every other value with its place. O(bytes of the tensors)."""
    digests, values = {}, []
    for where, leaf in _leaves({key: value for key, value in state.items() if key != DIGESTS}):
        if isinstance(leaf, torch.Tensor):
            digests[where] = _tensor_digest(leaf)
        else:
            values.append(f"{where} = {leaf!r}")
    digests[VALUES] = hashlib.blake2b("\n".join(sorted(values)).encode(), digest_size=32).hexdigest()
    return digests


def check_digests(state: dict, path: str) -> None:
    """One-line TrainerError, naming the first tensor (or the values) that differs, unless every
    digest ``state`` recorded at save matches what it holds now."""
    recorded = state.get(DIGESTS)
    if recorded is None:
        raise TrainerError(f"checkpoint {path} carries no digests: it was written by an older trainer, before "
                           f"checkpoints could be checked; continue it with that version, or start a fresh run")
    if not isinstance(recorded, dict):
        raise TrainerError(f"checkpoint {path} is damaged: its digests entry is a {type(recorded).__name__}, "
                           f"not a dict; resume from an intact copy or start a fresh run")
    found = state_digests(state)
    for where in sorted(set(recorded) | set(found), key=lambda w: (w == VALUES, str(w))):
        if recorded.get(where) != found.get(where):
            what = ("a value that is not a tensor (its config, position or rows)" if where == VALUES
                    else f"tensor {where}" if where in found else f"the recorded tensor {where}")
            change = ("is missing" if where not in found else "has no recorded digest" if where not in recorded
                      else "does not match the digest recorded when it was saved")
            raise TrainerError(f"checkpoint {path} is damaged: {what} {change}; nothing was restored: "
                               f"resume from an intact copy of the run dir, or start a fresh run")


def _leaves(value: object, where: str = "") -> Iterator[tuple[str, object]]:
    """(place, value) of every tensor and plain value in nested dicts, lists and tuples;
    containers give their length too (so an emptied one differs)."""
    if isinstance(value, Mapping):
        yield where, f"<{len(value)} entries>"
        for key, item in value.items():
            yield from _leaves(item, f"{where}[{key!r}]" if where else str(key))
    elif isinstance(value, (list, tuple)):
        yield where, f"<{len(value)} items>"
        for index, item in enumerate(value):
            yield from _leaves(item, f"{where}[{index}]")
    else:
        yield where, value


def _tensor_digest(tensor: torch.Tensor) -> str:
    """blake2b-256 (hex) of a tensor's dtype, shape and bytes (C order, as on the CPU)."""
    tensor = tensor.detach().cpu().contiguous()
    hasher = hashlib.blake2b(f"{tensor.dtype}{tuple(tensor.shape)};".encode(), digest_size=32)
    hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:   # already gone, or an unwritable directory: nothing this process can remove
        pass


def _why(err: BaseException) -> str:
    """A library's message in one short line: torch's ENOSPC is a multi-line RuntimeError."""
    text = " ".join((err.strerror if isinstance(err, OSError) and err.strerror else str(err)).split())
    return f"{type(err).__name__}: {text}"[:200]


# What every checkpoint holds (the module docstring); a file without one of these cannot resume.
REQUIRED_KEYS = ("config", "round", "epoch", "model", "optimizer", "memory", "rounds", "history",
                 "round_seconds", "rng")


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at ``path`` as a dict, read with ``weights_only=True``: tensors, numbers,
    strings, lists and dicts only, so a shared checkpoint cannot run code when it is loaded.
    A missing, torn, foreign or code-carrying file, one without a REQUIRED_KEYS entry, or one
    whose tensors or values do not match the digests recorded at save (``check_digests``: one
    pass over every byte) is a one-line TrainerError."""
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
    check_digests(state, path)
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

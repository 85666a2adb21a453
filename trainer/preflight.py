"""Every check a run makes before it writes anything, in one place, run once per process.

``trainer run`` calls :func:`preflight` in the launching process, so bad input gives one line
there instead of W failing workers and restarts, and hands the one-process ``train`` the data it
decoded. A worker process (``--world-size W``, an outer torchrun) or a caller of the Python API
gets the same checks from ``train`` itself, which runs :func:`preflight` when it is given no data.
"""
from __future__ import annotations

import os

from nbr_index.checks import resolve_device
from trainer.checkpoint import checkpoint_path
from trainer.config import TrainConfig, validate, validate_for_data
from trainer.data import ImageDataset, load_dataset
from trainer.errors import TrainerError
from trainer.models import check_compiler


def preflight(cfg: TrainConfig, world_size: int, resume: bool, local_workers: int = 1) -> ImageDataset:
    """Check ``cfg`` (resolved) for a run of ``world_size`` ranks and return its decoded data.

    local_workers: how many of the ranks this process starts on this machine (``trainer run
    --world-size W``: W; a worker itself: 1), each needing a GPU with ``--device cuda``.
    Raises a one-line storage.UserError for bad input; writes nothing (the write checks make a
    probe directory and remove it).
    """
    validate(cfg)
    resolve_device(cfg.device, local_workers)
    check_run_dir(cfg, resume)
    check_writable(cfg)
    if cfg.compile:
        check_compiler()
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size, cfg.hflip, cfg.workers)
    if world_size > len(data.train):
        raise TrainerError(f"--world-size {world_size} is larger than the training set (N = {len(data.train)})")
    validate_for_data(cfg, len(data.train), world_size)
    check_existing_store(cfg, len(data.train), data.dataset_id, data.image_size, fresh=not resume)
    return data


def check_run_dir(cfg: TrainConfig, resume: bool) -> None:
    """A fresh run needs a run dir without a checkpoint; --resume needs one with it."""
    has_checkpoint = os.path.exists(checkpoint_path(cfg.run_dir))
    if resume and not has_checkpoint:
        raise TrainerError(f"nothing to resume: {checkpoint_path(cfg.run_dir)} does not exist")
    if not resume and has_checkpoint:
        raise TrainerError(f"{cfg.run_dir} already holds a run: pass --resume to continue it, or another --run-dir")


def check_writable(cfg: TrainConfig) -> None:
    """The run dir and the store can be written (tried, not read from permission bits, which root
    ignores): found here, before the first epoch, not when the first checkpoint or round is saved."""
    from storage import check_store_writable
    from storage.location import local_write_problem

    problem = local_write_problem(cfg.run_dir)
    if problem is not None:
        raise TrainerError(f"run dir {cfg.run_dir} cannot be written ({problem}): use a writable --run-dir")
    check_store_writable(cfg.store)


def check_existing_store(cfg: TrainConfig, n: int, dataset_id: str, image_size: int, fresh: bool) -> None:
    """A store already at cfg.store must match this run's N, dim and dataset, and a fresh run
    must not find rounds of another run in it. No store yet is fine: rank 0 creates it."""
    from storage import Store, StoreError
    from trainer.run_store import snapshot_dim

    try:
        existing = Store.open(cfg.store)
    except StoreError:
        return
    existing.check_matches(n, snapshot_dim(cfg, image_size), dataset_id)
    if fresh and (existing.complete_feature_rounds() or existing.published_rounds()):
        raise TrainerError(f"store {cfg.store} already holds rounds of another run: pass --resume, "
                           f"or a fresh --store")

"""The run's store, from the trainer's side: created (or opened) once, written at every round's end.

``storage`` alone knows the format; this module says when a run touches it: rank 0 creates the
store (holding the run's locks: ``trainer.run_lock``), removes the feature staging of dead writers,
records the labels (for consistency reports only), all ranks write each round's
features/round-r (the memory bank, or with ``--neighbour-features backbone`` the backbone's features
of the un-augmented images), and the end-of-run report reads the published entropies.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.data import ImageDataset
from trainer.evaluation import embed_split
from trainer.models import backbone_dim
from trainer.provenance import ForeignRound, foreign_snapshot_problem
from trainer.run_lock import RunLocks
from trainer.world import World


def snapshot_dim(cfg: TrainConfig, image_size: int) -> int:
    """Columns of the run's feature snapshots (the store's dim): the bank's d, or the backbone's F."""
    return backbone_dim(cfg.arch, image_size) if cfg.neighbour_features == "backbone" else cfg.dim


def open_store(cfg: TrainConfig, data: ImageDataset, world: World, locks: RunLocks):
    """Create (rank 0) or open the run's store, with the labels recorded once. ``trainer.preflight``
    has checked that a store already there matches this run; ``locks`` (``run_lock.run_locks``)
    make this run its one writer. Every rank's handle writes feature staging under the run's id;
    rank 0's checks the lease before each write."""
    from storage import Store

    if world.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        curriculum = {"rounds": cfg.rounds, "k": cfg.k, "tau": cfg.tau, "mode": cfg.anchor_mode,
                      "selection": cfg.selection}
        if cfg.max_anchor_fraction != 1.0:
            # Recorded only where it caps: absent means 1 (the paper), so the stores of runs made
            # before the cap existed still match their resumed runs.
            curriculum["max_anchor_fraction"] = cfg.max_anchor_fraction
        if cfg.neighbour_features != "bank":   # likewise: absent means the bank
            curriculum["neighbour_features"] = cfg.neighbour_features
        store = Store.create_or_open(cfg.store, n=len(data.train), dim=snapshot_dim(cfg, data.image_size),
                                     dataset_id=data.dataset_id, curriculum=curriculum)
        store.write_as(locks.run_id, locks.lease)
        # This run holds the lease: a staging snapshot of any other writer is a dead run's.
        store.remove_dead_staging()
        if store.read_labels() is None:
            store.write_labels(data.train.labels.cpu().numpy().astype(np.int64))
    world.barrier()
    return store if world.is_main else Store.open(cfg.store).write_as(locks.run_id)


def snapshot_rows(cfg: TrainConfig, model: torch.nn.Module, memory: torch.Tensor, data: ImageDataset,
                  world: World) -> torch.Tensor:
    """What features/round-r holds, the rows the next rebuild finds neighbours and entropies in:
    the memory bank (N, d), as the paper does, or with ``neighbour_features = "backbone"`` the
    network's backbone features (N, F) of the un-augmented training images, L2-normalised (the
    index's similarities are inner products), each rank embedding its slice. Every rank calls this."""
    if cfg.neighbour_features == "bank":
        return memory
    feats = embed_split(model, data, "train", max(256, cfg.batch_size), world, head=False)
    return torch.nn.functional.normalize(feats, dim=1)


def write_feature_snapshot(store, r: int, rows: torch.Tensor, world: World) -> str:
    """features/round-r <- rows (N, store dim) (``snapshot_rows``), written by all ranks together:
    rank 0 prepares, each rank writes the chunks it owns (chunk c belongs to rank c % W), rank 0
    completes, all in the staging snapshot named by the run's id (``open_store`` gave every rank's
    handle the id rank 0 broadcast). A snapshot already complete (a resumed run) is left as it is
    once it is known to be this run's, with the checksum of ``rows``; another run's is refused
    (``trainer.provenance.ForeignRound``, on every rank). Returns the checksum of ``rows``
    (``Store.features_checksum``), which the run's next neighbourhood round must be computed from."""
    bank = rows.detach().float().cpu().numpy()
    checksum = store.features_checksum(bank)   # every rank holds the same rows
    existing = world.broadcast_object(_existing_snapshot(store, r, checksum) if world.is_main else None)
    if existing == OWN_SNAPSHOT:
        return checksum
    if existing != NO_SNAPSHOT:
        raise ForeignRound(existing)
    if world.is_main:
        store.prepare_features(r)
    world.barrier()
    store.write_feature_chunks(r, bank, world.rank, world.world_size)
    world.barrier()
    if world.is_main:
        store.complete_features(r)
    world.barrier()
    return checksum


# What rank 0 found at features/round-r before writing it (otherwise: why it is not this run's).
NO_SNAPSHOT, OWN_SNAPSHOT = "absent", "own"


def _existing_snapshot(store, r: int, checksum: str) -> str:
    """Rank 0: NO_SNAPSHOT, OWN_SNAPSHOT (complete with ``checksum``), or one line saying why the
    complete snapshot there is not this run's; never raises (the other ranks wait for it)."""
    from storage import UserError

    if r not in store.complete_feature_rounds():
        return NO_SNAPSHOT
    try:
        found = store.feature_reader(r).checksum
    except UserError as err:
        return str(err)
    return foreign_snapshot_problem(found, r, store.url, checksum) or OWN_SNAPSHOT


def published_entropies(store, cfg: TrainConfig) -> dict[int, np.ndarray]:
    """{round: entropy (N,)} of the neighbourhood rounds this run used (for the entropy plot)."""
    if not cfg.uses_neighbourhoods:
        return {}
    return {r: np.asarray(store.read_neighbourhoods(r).entropy)
            for r in store.published_rounds() if 1 <= r <= cfg.rounds}

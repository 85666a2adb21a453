"""The run's store, from the trainer's side: created (or opened) once, written at every round's end.

``storage`` alone knows the format; this module says when a run touches it: rank 0 creates the
store and records the labels (for consistency reports only), all ranks write each round's
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
from trainer.world import World


def snapshot_dim(cfg: TrainConfig, image_size: int) -> int:
    """Columns of the run's feature snapshots (the store's dim): the bank's d, or the backbone's F."""
    return backbone_dim(cfg.arch, image_size) if cfg.neighbour_features == "backbone" else cfg.dim


def open_store(cfg: TrainConfig, data: ImageDataset, world: World):
    """Create (rank 0) or open the run's store, with the labels recorded once. ``trainer.preflight``
    has checked that a store already there matches this run."""
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
        if store.read_labels() is None:
            store.write_labels(data.train.labels.cpu().numpy().astype(np.int64))
    world.barrier()
    return store if world.is_main else Store.open(cfg.store)


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


def write_feature_snapshot(store, r: int, rows: torch.Tensor, world: World) -> None:
    """features/round-r <- rows (N, store dim) (``snapshot_rows``), written by all ranks together:
    rank 0 prepares, each rank writes the chunks it owns (chunk c belongs to rank c % W), rank 0
    completes. A snapshot already complete (a resumed run) is left as it is."""
    done = world.broadcast_object(r in store.complete_feature_rounds() if world.is_main else None)
    if done:
        return
    bank = rows.detach().float().cpu().numpy()
    if world.is_main:
        store.prepare_features(r)
    world.barrier()
    store.write_feature_chunks(r, bank, world.rank, world.world_size)
    world.barrier()
    if world.is_main:
        store.complete_features(r)
    world.barrier()


def published_entropies(store, cfg: TrainConfig) -> dict[int, np.ndarray]:
    """{round: entropy (N,)} of the neighbourhood rounds this run used (for the entropy plot)."""
    if not cfg.uses_neighbourhoods:
        return {}
    return {r: np.asarray(store.read_neighbourhoods(r).entropy)
            for r in store.published_rounds() if 1 <= r <= cfg.rounds}

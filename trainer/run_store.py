"""The run's store, from the trainer's side: created (or opened) once, written at every round's end.

``storage`` alone knows the format; this module says when a run touches it: rank 0 creates the
store and records the labels (for consistency reports only), all ranks write each round's memory
bank as features/round-r, and the end-of-run report reads the published entropies.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.data import ImageDataset
from trainer.world import World


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
        store = Store.create_or_open(cfg.store, n=len(data.train), dim=cfg.dim, dataset_id=data.dataset_id,
                                     curriculum=curriculum)
        if store.read_labels() is None:
            store.write_labels(data.train.labels.cpu().numpy().astype(np.int64))
    world.barrier()
    return store if world.is_main else Store.open(cfg.store)


def write_feature_snapshot(store, r: int, memory: torch.Tensor, world: World) -> None:
    """features/round-r <- the memory bank (N, d), written by all ranks together: rank 0 prepares,
    each rank writes the chunks it owns (chunk c belongs to rank c % W), rank 0 completes. A
    snapshot already complete (a resumed run) is left as it is."""
    done = world.broadcast_object(r in store.complete_feature_rounds() if world.is_main else None)
    if done:
        return
    bank = memory.detach().float().cpu().numpy()
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

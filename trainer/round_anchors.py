"""A training round's anchors and neighbourhoods, as the trainer consumes them from the store.

``nbr_index`` decides them (kNN + entropy of features/round-(r-1), the curriculum's share of
lowest-entropy samples as anchors) and publishes neighbourhoods/round-r; this module gets that
round onto the training device: rebuilt in-process by all ranks together (``--index inline``) or
waited for until ``nbr-index serve`` publishes it (``--index service``). Either way, the round is
checked to be this run's own (``trainer.provenance``) before anything trains on it.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from storage import UserError
from trainer.config import TrainConfig
from trainer.errors import TrainerError
from trainer.provenance import ForeignRound, foreign_round_problem
from trainer.world import World

# How often a trainer in --index service mode looks for a published round, and says it waits.
POLL_S = 1.0
WAIT_NOTE_S = 30.0


class IndexTimeout(TrainerError):
    """No neighbourhood round was published in time (``--index service``)."""


class IndexFailed(TrainerError):
    """The index process recorded that it could not rebuild the round waited for."""


@dataclass
class RoundAnchors:
    """The anchors of one training round, on the training device."""
    is_anchor: torch.Tensor | None   # (N,) bool; None: instance loss for every sample
    neighbours: torch.Tensor | None  # (N, k) int64 neighbours of every sample (used for anchors)
    count: int                       # number of anchors
    consistency: float | None        # percent of anchor neighbours sharing the anchor's label
    entropy: np.ndarray | None = None  # (N,) H_i the anchors were selected by (reports only)


NO_ANCHORS = RoundAnchors(None, None, 0, None)


def anchors_for_round(r: int, cfg: TrainConfig, store, world: World, say: Callable[[str], None],
                      own_source: str | None = None) -> RoundAnchors:
    """Round 0 and the instance method: no anchors. Otherwise neighbourhoods/round-r from the store,
    once it is known to be this run's: computed from the snapshot with checksum ``own_source`` (this
    run's features/round-(r-1); None: a checkpoint written before the run kept it, so the snapshot
    in the store) with the run's curriculum. ForeignRound (one line, on every rank) otherwise."""
    if r == 0 or not cfg.uses_neighbourhoods:
        return NO_ANCHORS
    if cfg.index == "inline":  # every rank computes its share of the tiles; rank 0 publishes
        from nbr_index import ProcessGroupShard, rebuild

        start = time.perf_counter()
        result = rebuild(store, r, rounds=cfg.rounds, k=cfg.k, tau=cfg.tau, mode=cfg.anchor_mode,
                         selection=cfg.selection, max_anchor_fraction=cfg.max_anchor_fraction,
                         backend=cfg.index_backend, device=str(world.device),
                         shard=ProcessGroupShard(world.rank, world.world_size))
        say(f"neighbourhoods/round-{r} rebuilt inline in {time.perf_counter() - start:.1f}s" if result.published
            else f"neighbourhoods/round-{r} already published (resumed run): using it")
    else:
        wait_for_neighbourhoods(store, r, cfg.index_timeout, say)
    nb = store.read_neighbourhoods(r)
    # Rank 0 decides, so that every rank stops together or none does.
    problem = world.broadcast_object(_foreign_problem(nb.attrs, r, cfg, store, own_source) if world.is_main else None)
    if problem is not None:
        raise ForeignRound(problem)
    is_anchor = torch.from_numpy(np.asarray(nb.anchor, dtype=bool)).to(world.device)
    neighbours = torch.from_numpy(np.asarray(nb.neighbours, dtype=np.int64)).to(world.device)
    consistency = nb.attrs.get("consistency")
    return RoundAnchors(is_anchor, neighbours, int(is_anchor.sum()),
                        None if consistency is None else float(consistency), np.asarray(nb.entropy))


def _foreign_problem(attrs: dict, r: int, cfg: TrainConfig, store, own_source: str | None) -> str | None:
    """Rank 0: why the round is not this run's, or None; never raises (the other ranks wait for it)."""
    try:
        if own_source is None:  # the run's checksum is not known: the snapshot it wrote is the one in the store
            own_source = store.feature_reader(r - 1).checksum
    except UserError as err:
        return str(err)
    return foreign_round_problem(attrs, r, cfg, store.url, own_source)


def wait_for_neighbourhoods(store, r: int, timeout: float, say: Callable[[str], None], poll: float = POLL_S) -> None:
    """Block until neighbourhoods/round-r is published (by ``nbr-index serve``); raise IndexFailed
    when the index recorded that rebuilding it failed, IndexTimeout after ``timeout`` seconds."""
    start = time.monotonic()
    noted = -math.inf
    while r not in store.published_rounds():
        failure = store.index_failure(r)
        if failure is not None:
            raise IndexFailed(f"nbr-index serve failed to rebuild neighbourhoods/round-{r} in {store.url}: {failure}; "
                              f"see its log, fix the cause and rerun (training resumes from the last checkpoint)")
        waited = time.monotonic() - start
        if waited >= timeout:
            raise IndexTimeout(f"timed out after {timeout:.0f}s waiting for neighbourhoods/round-{r} in {store.url}: "
                               f"start `nbr-index serve --store {store.url}` or use --index inline")
        if waited - noted >= WAIT_NOTE_S:
            noted = waited
            say(f"waiting for neighbourhoods/round-{r} (from features/round-{r - 1}) to be published by "
                f"nbr-index serve in {store.url} ({waited:.0f}s of {timeout:.0f}s)")
        time.sleep(min(poll, max(0.0, timeout - waited)))

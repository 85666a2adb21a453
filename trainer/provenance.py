"""Provenance: a run trains only on the snapshots and neighbourhood rounds that are its own.

A store outlives its runs and is shared with other processes (``nbr-index serve``, ``nbr-index
rebuild``, a run killed earlier): what the run finds in it may have been computed from other
features or with other parameters. Before a run uses anything it did not compute in this process:

- a complete features/round-r it would otherwise write (a resumed run skips writing it) must have
  the checksum of the rows the run would write (``storage.Store.features_checksum``);
- neighbourhoods/round-r must record ``source_checksum`` = the checksum of this run's own
  features/round-(r-1) (kept in the checkpoint: ``RunState.snapshot_checksums``), and the run's
  curriculum: k, tau, rounds, mode, selection, max_anchor_fraction and neighbour_features (an attr
  that older rounds omit means its default, as ``run_store.open_store`` omits them).

A mismatch is a :class:`ForeignRound`: one line naming both values; nothing is trained on it.
"""
from __future__ import annotations

from trainer.config import TrainConfig
from trainer.errors import TrainerError

# What a round's attrs mean where they lack a key (rounds published before the key existed).
ROUND_ATTR_DEFAULTS = {"selection": "entropy", "max_anchor_fraction": 1.0, "neighbour_features": "bank"}
# Hex digits of a checksum shown in messages: enough to tell two apart.
SHOWN_DIGITS = 16


class ForeignRound(TrainerError):
    """A feature snapshot or neighbourhood round in the store was not made by or for this run."""


def run_curriculum(cfg: TrainConfig) -> dict:
    """The parameters a neighbourhood round of this run is computed with, by the names of its attrs."""
    return {"k": cfg.k, "tau": cfg.tau, "rounds": cfg.rounds, "mode": cfg.anchor_mode, "selection": cfg.selection,
            "max_anchor_fraction": cfg.max_anchor_fraction, "neighbour_features": cfg.neighbour_features}


def foreign_round_problem(attrs: dict, r: int, cfg: TrainConfig, store_url: str, own_source: str) -> str | None:
    """Why neighbourhoods/round-r (its ``attrs``) is not this run's, in one line; None if it is.

    own_source: the checksum of this run's features/round-(r-1), the snapshot the round must be
    computed from."""
    where = f"neighbourhoods/round-{r} in {store_url}"
    for key, ours in run_curriculum(cfg).items():
        theirs = attrs.get(key, ROUND_ATTR_DEFAULTS.get(key))
        if theirs != ours:
            return (f"{where} was computed with {key} = {theirs} but this run uses {key} = {ours}: it was made "
                    f"for another run (or by `nbr-index rebuild` with other settings), so nothing was trained on "
                    f"it; train into a fresh --store")
    recorded = attrs.get("source_checksum")
    if recorded != own_source:
        return (f"{where} was computed from features with checksum {_shown(recorded)} but this run's "
                f"features/round-{r - 1} have checksum {_shown(own_source)}: it was made from another run's "
                f"features, so nothing was trained on it; train into a fresh --store")
    return None


def foreign_snapshot_problem(found: str, r: int, store_url: str, own: str) -> str | None:
    """Why a complete features/round-r with checksum ``found`` is not the snapshot of this run's
    rows (checksum ``own``), in one line; None if it is."""
    if found == own:
        return None
    return (f"features/round-{r} in {store_url} is complete with checksum {_shown(found)} but this run's "
            f"round-{r} features have checksum {_shown(own)}: another run wrote it, and the rounds after it "
            f"would be computed from that run's features; train into a fresh --store")


def _shown(checksum: object) -> str:
    return f"{checksum[:SHOWN_DIGITS]}..." if isinstance(checksum, str) else "(none recorded)"

"""``rebuild``: features/round-(r-1) -> k-NN + entropy -> anchors -> neighbourhoods/round-r.

The one code path for every caller: ``nbr-index rebuild``, ``nbr-index serve`` and the trainer's
in-process rebuild between rounds. Publishing is atomic and idempotent (storage's
``publish_neighbourhoods``): a round already published is returned as it is, never recomputed
or overwritten, so a restarted or duplicated caller cannot publish a round twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from storage import Store
from storage.errors import UserError

from .backends import knn_entropy, resolve_backend
from .checks import check_k, check_tau, resolve_device
from .curriculum import (MODES, check_max_fraction, check_round, neighbourhood_consistency, pair_consistency,
                         select_anchors)
from .errors import FeaturesNotReadyError, InvalidFeaturesError, InvalidParameterError
from .fused import BlockSizes, Progress, check_shard_count, default_block_sizes, row_block_count, tile_rows
from .selection import ORACLE, check_selection, class_nearest, mutual_nearest, preferred_rows, stable_nearest
from .shard import ProcessGroupShard

# Used when the store records no curriculum (the trainer normally writes one).
# neighbour_features: what the trainer publishes as features/round-r, the memory bank (the paper) or
# its backbone's features of the un-augmented images; only the trainer can make them, so the index
# records it and takes no flag for it.
DEFAULT_CURRICULUM = {"rounds": 4, "k": 1, "tau": 0.1, "mode": "progressive", "selection": "entropy",
                      "max_anchor_fraction": 1.0, "neighbour_features": "bank"}


@dataclass
class RebuildResult:
    """What neighbourhoods/round-``round`` holds.

    neighbours (N, k) int64; entropy (N,) float32; anchor (N,) bool; attrs as published.
    published: True if this call published the round, False if it was already there.
    """

    round: int
    published: bool
    neighbours: np.ndarray
    entropy: np.ndarray
    anchor: np.ndarray
    attrs: dict

    @property
    def anchors(self) -> int:
        return int(self.anchor.sum())

    def summary(self) -> str:
        """One line for logs and the CLI."""
        a = self.attrs
        state = "published" if self.published else "already published"
        consistency = a.get("consistency")
        parts = [
            f"round {self.round} {state}: {self.anchors} anchors of {self.anchor.size}",
            f"k={a.get('k')}",
            f"tau={a.get('tau')}",
            f"mode={a.get('mode')}",
            f"selection={a.get('selection', 'entropy')}",
            f"max_anchor_fraction={a.get('max_anchor_fraction', 1.0)}",
            f"neighbour_features={a.get('neighbour_features', 'bank')}",
            f"from features round {a.get('source_features_round')}",
            f"{a.get('seconds', float('nan')):.2f} s",
            f"backend {a.get('backend')} on {a.get('device', '?')}",
        ]
        if isinstance(consistency, (int, float)):
            parts.append(f"consistency {consistency:.1f}%")
        if isinstance(a.get("found_consistency"), (int, float)):  # the oracle's: before it replaced them
            parts.append(f"found consistency {a['found_consistency']:.1f}%")
        if isinstance(a.get("recall"), (int, float)):
            parts.append(f"recall@k {a['recall']:.4f}")
        return ", ".join(parts)

    def to_json(self) -> dict:
        return {"round": self.round, "published": self.published, "anchors": self.anchors, **self.attrs}



def store_curriculum(store: Store) -> dict:
    """{"rounds", "k", "tau", "mode", "selection", "max_anchor_fraction", "neighbour_features"}: what
    the trainer recorded in the store, defaults for the rest."""
    return {**DEFAULT_CURRICULUM, **(store.info.curriculum or {})}


# The curriculum parameters rebuild and serve take, by the curriculum's key: their command-line flag.
CURRICULUM_FLAGS = {"rounds": "--rounds", "k": "--k", "tau": "--tau", "mode": "--mode", "selection": "--selection",
                    "max_anchor_fraction": "--max-anchor-fraction"}


def check_agrees_with_curriculum(store: Store, options: dict) -> None:
    """Refuse a curriculum parameter of ``options`` (CURRICULUM_FLAGS; None: not given) that
    differs from the curriculum the store records: the trainer training on the store refuses a
    round computed with other parameters (``trainer.provenance``), and a published round is never
    replaced, so such a round would end its run. One line naming both values. A store without a
    curriculum (``trainer embed``, ``Store.create_or_open`` without one) takes any parameters."""
    if store.info.curriculum is None:
        return
    curriculum = store_curriculum(store)
    for key, flag in CURRICULUM_FLAGS.items():
        given = options.get(key)
        if given is not None and given != curriculum[key]:
            raise InvalidParameterError(
                f"{flag} {given} disagrees with the curriculum of store {store.url}, which has {key} = "
                f"{curriculum[key]}: its trainer would refuse a round computed with it; leave {flag} out "
                f"(the store's curriculum is the default), or rebuild into a store of its own")


@dataclass(frozen=True)
class _Parameters:
    rounds: int
    k: int
    tau: float
    mode: str
    selection: str
    max_anchor_fraction: float
    neighbour_features: str


def check_rebuild_arguments(store: Store, round: int, *, rounds: int | None = None, k: int | None = None,
                            tau: float | None = None, mode: str | None = None, selection: str | None = None,
                            max_anchor_fraction: float | None = None, backend: str = "auto",
                            device: str = "cpu", world_size: int = 1, block_sizes: BlockSizes | None = None,
                            **_compute_options) -> _Parameters:
    """The curriculum parameters of ``round`` (defaults from the store), or a one-line error for
    bad ones, an unusable backend or device, or a world size the pass cannot be split into."""
    curriculum = store_curriculum(store)
    rounds = curriculum["rounds"] if rounds is None else rounds
    k = curriculum["k"] if k is None else k
    tau = float(curriculum["tau"] if tau is None else tau)
    mode = curriculum["mode"] if mode is None else mode
    selection = curriculum["selection"] if selection is None else selection
    max_anchor_fraction = curriculum["max_anchor_fraction"] if max_anchor_fraction is None else max_anchor_fraction
    n = store.info.n
    check_round(round, rounds)
    if mode not in MODES:
        raise InvalidParameterError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_selection(selection)
    check_max_fraction(max_anchor_fraction)
    check_k(k, n)
    check_tau(tau)
    torch_device = resolve_device(device)
    resolved = resolve_backend(backend, torch_device)  # an unusable backend/device fails before any work
    if world_size != 1:
        if resolved != "torch":
            raise InvalidParameterError(f"--world-size {world_size} needs backend torch (or auto), got {backend}")
        check_shard_count(n, tile_rows(n, block_sizes or default_block_sizes(torch_device)), world_size)
    return _Parameters(int(rounds), int(k), tau, mode, selection, float(max_anchor_fraction),
                       str(curriculum["neighbour_features"]))


def rebuild(
    store: Store,
    round: int,
    *,
    rounds: int | None = None,
    k: int | None = None,
    tau: float | None = None,
    mode: str | None = None,
    selection: str | None = None,
    max_anchor_fraction: float | None = None,
    backend: str = "auto",
    device: str = "cpu",
    progress: Progress | None = None,
    shard: ProcessGroupShard | None = None,
    **compute_options,
) -> RebuildResult:
    """Compute and publish neighbourhoods/round-``round`` from features/round-(round-1).

    rounds, k, tau, mode, selection (``nbr_index.selection``) and max_anchor_fraction (the cap of
    ``curriculum.anchor_count``) default to ``store.info.curriculum``. compute_options go to
    ``knn_entropy`` (in_memory_bytes, chunk_read_rows, block_sizes, matmul_precision, workers,
    nlist, nprobe). Returns the published round, or the one found already published.
    shard: this process's part of a rebuild split over a process group (``nbr_index.shard``):
    every worker calls rebuild, they compute the tiles together (backend torch, at most one
    worker per row block; otherwise rank 0 computes alone), rank 0 publishes, and every worker
    returns the round.
    Raises UserError subclasses, with nothing published, for bad parameters, features that are
    missing/incomplete/invalid, an unavailable backend/device, or (sharded) workers that do not
    see the same store.
    """
    started = time.perf_counter()
    shard = shard or ProcessGroupShard(0, 1)
    prepared = error = None
    try:
        # Only the fused pass splits its tiles, over at most one worker per row block; a FAISS
        # backend (or a pass too small to split) runs on rank 0 while the others wait.
        torch_device = resolve_device(device)
        blocks = row_block_count(store.info.n, tile_rows(store.info.n, compute_options.get("block_sizes")
                                                         or default_block_sizes(torch_device)))
        split = 1 < shard.count <= blocks and resolve_backend(backend, torch_device) == "torch"
        prepared = _prepare(store, round, backend, device, shard.count if split else 1,
                            compute_options.get("block_sizes"), rounds=rounds, k=k, tau=tau, mode=mode,
                            selection=selection, max_anchor_fraction=max_anchor_fraction)
    except UserError as failure:
        error = failure
    views = shard.agree(None if prepared is None else prepared.view, error)
    if any(view["_published"] for view in views):
        return published_result(store, round, published=False)
    if not split and not shard.is_main:
        shard.barrier()
        return published_result(store, round, published=False)

    parameters, reader = prepared.parameters, prepared.reader
    n = store.info.n
    result = knn_entropy(
        reader, k=parameters.k, tau=parameters.tau, backend=backend, device=device, progress=progress,
        expected_dim=store.info.dim, shard=shard if split else None, **compute_options,
    )
    mutual = mutual_nearest(result.neighbours)
    stable = None if prepared.previous is None else stable_nearest(result.neighbours, prepared.previous)
    anchor = select_anchors(result.entropy, round, parameters.rounds, parameters.mode,
                            preferred_rows(parameters.selection, mutual, stable), parameters.max_anchor_fraction)
    attrs = {
        "round": round,
        "rounds": parameters.rounds,
        "k": parameters.k,
        "tau": parameters.tau,
        "fraction": float(anchor.sum()) / n,
        "mode": parameters.mode,
        "selection": parameters.selection,
        "max_anchor_fraction": parameters.max_anchor_fraction,
        "neighbour_features": parameters.neighbour_features,
        # share of rows that are a mutual nearest neighbour (what the mutual rule takes first)
        "mutual_fraction": float(mutual.mean()),
        "source_features_round": round - 1,
        "source_checksum": reader.checksum,
        "backend": result.backend,
        "device": result.device,
        **{key: value for key, value in result.details.items() if value is not None},
    }
    if stable is not None:  # share of rows whose nearest neighbour survived the round (the stable rule's first)
        attrs["stable_fraction"] = float(stable.mean())
    if result.recall is not None:
        attrs["recall"] = result.recall
    labels = prepared.labels
    neighbours = result.neighbours
    if parameters.selection == ORACLE and shard.is_main and anchor.any():
        # The measurement (nbr_index.selection): what the features found, then the anchors' own-class
        # neighbours in their place. Rows that are not anchors keep what was found (training reads
        # only the anchors' neighbours).
        attrs["found_consistency"] = neighbourhood_consistency(neighbours, anchor, labels)
        neighbours = neighbours.copy()
        neighbours[anchor] = class_nearest(reader.read_all(), labels, parameters.k, np.flatnonzero(anchor))
    if labels is not None and anchor.any():
        attrs["consistency"] = neighbourhood_consistency(neighbours, anchor, labels)
        attrs["pair_consistency"] = pair_consistency(neighbours, anchor, labels)
    attrs["seconds"] = time.perf_counter() - started

    published = False
    if shard.is_main:
        published = store.publish_neighbourhoods(
            round, neighbours.astype(np.int64, copy=False), result.entropy.astype(np.float32, copy=False),
            anchor, attrs,
        )
    shard.barrier()  # rank 0 has published (or found the round there) before any worker returns
    if not published:  # another worker's round, or another process published it meanwhile
        return published_result(store, round, published=False)
    return RebuildResult(round, True, neighbours, result.entropy, anchor, {**attrs, "anchors": int(anchor.sum())})


@dataclass
class _Prepared:
    parameters: _Parameters
    reader: object  # storage.FeatureReader of features/round-(round-1); None when published already
    view: dict  # what this worker is about to compute (compared across the workers of a shard)
    previous: np.ndarray | None = None  # (N, k') neighbourhoods/round-(round-1), where published
    labels: np.ndarray | None = None  # (N,) the store's labels, where it has them (consistency; the oracle)


def _prepare(store: Store, round: int, backend: str, device: str, world_size: int, block_sizes,
             **parameters) -> _Prepared:
    """Check everything and open the source snapshot, before any work; raises one-line errors."""
    checked = check_rebuild_arguments(store, round, backend=backend, device=device, world_size=world_size,
                                      block_sizes=block_sizes, **parameters)
    n = store.info.n
    view = {"n": n, "dim": store.info.dim, "dataset_id": store.info.dataset_id, "round": round,
            "rounds": checked.rounds, "k": checked.k, "tau": checked.tau, "mode": checked.mode,
            "selection": checked.selection, "max_anchor_fraction": checked.max_anchor_fraction, "backend": backend,
            "block_rows": tile_rows(n, block_sizes or default_block_sizes(resolve_device(device)))}
    if round in store.published_rounds():
        return _Prepared(checked, None, {**view, "_published": True})

    source_round = round - 1
    complete = store.complete_feature_rounds()
    if source_round not in complete:
        raise FeaturesNotReadyError(
            f"neighbourhood round {round} waits for features round {source_round}, which is not "
            f"complete in store {store.url} (complete feature rounds: {complete or 'none'}); "
            f"finish training round {source_round} first"
        )
    reader = store.feature_reader(source_round)
    if (reader.n, reader.dim) != (n, store.info.dim):
        raise InvalidFeaturesError(
            f"features round {source_round} has shape ({reader.n}, {reader.dim}) but the store "
            f"is for ({n}, {store.info.dim}); the snapshot does not belong to this store"
        )
    previous = _previous_neighbours(store, round, checked.selection)
    labels = store.read_labels()
    if checked.selection == ORACLE and labels is None:
        raise InvalidParameterError(
            f"selection oracle replaces the anchors' neighbours by their own class's, but store {store.url} "
            f"holds no labels; write them (a labelled dataset in the trainer), or choose another selection"
        )
    return _Prepared(checked, reader, {**view, "source_checksum": reader.checksum, "_published": False}, previous,
                     labels)


def _previous_neighbours(store: Store, round: int, selection: str) -> np.ndarray | None:
    """(N, k') neighbours of the previous round where it is published (the stable rule's reference,
    and the stable_fraction attr); None in round 1. The stable rule refuses to run without it."""
    if round == 1:
        return None
    if round - 1 in store.published_rounds():
        return np.asarray(store.read_neighbourhoods(round - 1).neighbours)
    if selection == "stable":
        raise FeaturesNotReadyError(
            f"selection stable for round {round} compares with neighbourhoods round {round - 1}, which is not "
            f"published in store {store.url}; rebuild round {round - 1} first, or choose another selection"
        )
    return None


def published_result(store: Store, round: int, published: bool) -> RebuildResult:
    """The round as the store holds it."""
    found = store.read_neighbourhoods(round)
    return RebuildResult(round, published, found.neighbours, found.entropy, found.anchor, dict(found.attrs))

"""Neighbourhood rounds: k-NN, entropies and anchors used by one training round.

``neighbourhoods/round-r`` (r >= 1) is computed from ``features/round-(r-1)`` by one process
(the nbr-index service or the trainer's inline rebuild) and published atomically: readers see it
complete and checksummed, or not at all. A published round is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from storage.checksums import (DIGEST_NAME, combine, decoding_metadata, open_recorded_array,
                               read_verified, recorded_decoding, recorded_digests, row_chunk_digests,
                               to_hex, unreadable_node)
from storage.errors import StoreError
from storage.layout import NEIGHBOUR_ARRAYS, NEIGHBOURHOODS, failure_path, neighbourhoods_path, parse_round_name
from storage.location import Location
from storage.publish import is_complete, mark_complete, node_attrs, publish_node, store_io
from storage.validate import check_array, check_index_range, check_round, jsonable

#: What the publisher must say about how a round was computed.
REQUIRED_ATTRS = ("tau", "fraction", "mode", "source_features_round", "backend", "seconds")
#: Written by storage itself; callers may not set them.
RESERVED_ATTRS = ("complete", "checksum", "digest", "digests", "decoding")
#: Attrs that stay internal to storage (read_neighbourhoods does not return them).
_INTERNAL_ATTRS = ("complete", "digest", "digests", "decoding")


@dataclass
class Neighbourhoods:
    """A published round.

    neighbours: (N, k) int64, row indices of each sample's k nearest neighbours (self excluded)
    entropy:    (N,) float32, H_i of each sample
    anchor:     (N,) bool, True for the samples selected as anchors this round
    attrs:      round, k, tau, fraction, mode, source_features_round, backend, seconds,
                anchors (count), consistency (if known), checksum, plus anything the publisher added
    """

    round: int
    neighbours: np.ndarray
    entropy: np.ndarray
    anchor: np.ndarray
    attrs: dict


def publish_neighbourhoods(location: Location, n: int, chunk_rows: int, round: int,
                           neighbours: np.ndarray, entropy: np.ndarray, anchor: np.ndarray,
                           attrs: dict) -> bool:
    """Publish round ``round`` atomically; False (nothing changed) if it is already published."""
    round = check_round(round, "neighbourhood round", minimum=1)
    check_array("neighbours", neighbours, (n, None), "int64")
    k = neighbours.shape[1]
    if k < 1:
        raise StoreError("neighbours must have at least one column (k >= 1), got shape "
                         f"{tuple(neighbours.shape)}")
    check_index_range("neighbours", neighbours, n)
    check_array("entropy", entropy, (n,), "float32")
    check_array("anchor", anchor, (n,), "bool")
    record = _check_attrs(attrs, round, k, int(anchor.sum()))

    arrays = {"neighbours": neighbours, "entropy": entropy, "anchor": anchor}
    # Digests come from the caller's arrays, before any byte reaches the store.
    digests = {name: row_chunk_digests(arrays[name], chunk_rows) for name in NEIGHBOUR_ARRAYS}
    checksum = combine(d for name in NEIGHBOUR_ARRAYS for d in digests[name])

    def write(path: str) -> None:
        group = zarr.create_group(location.zarr_store, path=path,
                                  attributes={**record, "complete": False})
        decoding = {}
        for name in NEIGHBOUR_ARRAYS:
            array = arrays[name]
            stored = group.create_array(name, shape=array.shape,
                                        chunks=(chunk_rows,) + array.shape[1:],
                                        dtype=array.dtype, fill_value=0,
                                        config={"write_empty_chunks": True})
            stored[...] = array
            decoding[name] = decoding_metadata(stored)   # readers compare the zarr.json with it
        mark_complete(location, path, {"checksum": checksum, "digest": DIGEST_NAME,
                                       "digests": {name: to_hex(digests[name]) for name in NEIGHBOUR_ARRAYS},
                                       "decoding": decoding})

    with store_io(location, f"publish neighbourhood round {round}"):
        return publish_node(location, neighbourhoods_path(round), write)


def _check_attrs(attrs: object, round: int, k: int, anchors: int) -> dict:
    """The attrs to record: the caller's, plus round, k and the anchor count (checked if given)."""
    if not isinstance(attrs, dict):
        raise StoreError(f"attrs must be a dict, got {type(attrs).__name__}")
    missing = [key for key in REQUIRED_ATTRS if key not in attrs]
    if missing:
        raise StoreError(f"neighbourhood attrs lack {', '.join(missing)} "
                         f"(required: {', '.join(REQUIRED_ATTRS)})")
    reserved = [key for key in RESERVED_ATTRS if key in attrs]
    if reserved:
        raise StoreError(f"neighbourhood attrs may not set {', '.join(reserved)}: "
                         f"storage writes them")
    for key, value in (("round", round), ("k", k), ("anchors", anchors)):
        if key in attrs and attrs[key] != value:
            raise StoreError(f"neighbourhood attrs say {key}={attrs[key]!r} but the arrays "
                             f"give {key}={value}")
    return jsonable({**attrs, "round": round, "k": k, "anchors": anchors}, "neighbourhood attrs")


def read_neighbourhoods(location: Location, round: int) -> Neighbourhoods:
    """Read a published round, verifying every chunk against its recorded digest."""
    round = check_round(round, "neighbourhood round", minimum=1)
    path = neighbourhoods_path(round)
    attrs = node_attrs(location, path)
    if attrs is None and (damage := unreadable_node(location, path)):
        raise StoreError(f"neighbourhood round {round} cannot be opened: {damage}")
    if not attrs or attrs.get("complete") is not True:
        have = published_rounds(location)
        raise StoreError(f"neighbourhood round {round} is not published in store {location.url} "
                         f"(published: {have or 'none'}): run `nbr-index rebuild --round {round}`")
    digests = recorded_digests(path, attrs, NEIGHBOUR_ARRAYS)
    with store_io(location, f"read neighbourhood round {round}"):
        arrays = {}
        for name in NEIGHBOUR_ARRAYS:
            # Checked against the metadata recorded at publish: the chunk grid read here is the one written.
            stored = open_recorded_array(location, f"{path}/{name}", recorded_decoding(attrs, name),
                                         digests[name])
            arrays[name] = read_verified(stored, f"{path}/{name}", digests[name], stored.chunks[0],
                                         0, stored.shape[0])
    public = {key: value for key, value in attrs.items() if key not in _INTERNAL_ATTRS}
    return Neighbourhoods(round=round, attrs=public, **arrays)


def published_rounds(location: Location) -> list[int]:
    """Rounds whose neighbourhoods are published (complete), ascending."""
    rounds = (parse_round_name(name) for name in location.list_dir(NEIGHBOURHOODS))
    return [r for r in rounds if r is not None and is_complete(location, neighbourhoods_path(r))]


def record_failure(location: Location, round: int, error: str) -> None:
    """Note that rebuilding ``round`` raised ``error`` (one line), for whoever waits on it."""
    check_round(round, "neighbourhood round")
    with store_io(location, f"record the failure of neighbourhood round {round}"):
        zarr.create_group(location.zarr_store, path=failure_path(round), overwrite=True,
                          attributes={"round": round, "error": str(error)})


def recorded_failure(location: Location, round: int) -> str | None:
    """The error recorded for ``round`` by :func:`record_failure`, or None."""
    attrs = node_attrs(location, failure_path(round))
    return None if attrs is None else str(attrs.get("error", "unknown error"))


def clear_failure(location: Location, round: int) -> None:
    """Forget a recorded failure (a new rebuild of ``round`` is starting)."""
    with store_io(location, f"clear the failure of neighbourhood round {round}"):
        location.remove(failure_path(round))   # no error when there is none

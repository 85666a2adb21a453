"""Feature snapshots: the memory bank after a training round, written by W ranks at once.

Flow (every rank holds the whole bank, shape (N, d) float32):

1. rank 0: ``prepare_features(r, writer)`` creates an empty snapshot at its writing path (on
   local disk the staging name of ``writer``, the run's id shared by its ranks; the final name
   elsewhere), wiping what a killed earlier attempt of the same writer left there, never
   another writer's staging;
2. barrier; every rank w: ``write_feature_chunks(r, bank, w, W, writer)`` writes the row chunks
   c with c % W == w, each followed by its digest in that chunk's own zarr chunk of ``digests``,
   so no two ranks ever write the same object;
3. barrier; one process: ``complete_features(r, writer)`` checks every digest is present, records the
   snapshot checksum and the digests in the attrs, sets ``complete`` and (local) renames the
   snapshot into place.

A complete snapshot is immutable: preparing or writing it again does nothing. Staging of other,
dead writers is removed by :func:`remove_dead_staging`, which only the holder of the store's
writer lease calls (then no other writer is alive).
"""

from __future__ import annotations

import numpy as np
import zarr

from storage.checksums import (DIGEST_NAME, DIGEST_SIZE, MISSING, chunk_digest, combine,
                               decoding_metadata, open_recorded_array, read_verified,
                               recorded_decoding, recorded_digests, to_hex, unreadable_node)
from storage.errors import StoreError
from storage.layout import (DIGESTS, FEATURES, ROWS, chunk_bounds, chunk_key, features_path,
                            features_staging_path, is_writer_id, n_chunks, parse_round_name,
                            parse_staging_name)
from storage.location import Location, one_line
from storage.publish import is_complete, mark_complete, node_attrs, store_io
from storage.validate import check_array, check_rank, check_round


def writing_path(location: Location, round: int, writer: str) -> str:
    """Where the ranks of ``writer`` write snapshot ``round`` before it is complete."""
    if not is_writer_id(writer):
        raise StoreError(f"writer id must be 1-64 letters, digits, '_', '.' or '-', got {writer!r}")
    return features_staging_path(round, writer) if location.is_local else features_path(round)


def prepare_features(location: Location, n: int, dim: int, chunk_rows: int, round: int, writer: str) -> None:
    """Create an empty snapshot for ``round`` for the ranks of ``writer`` (one process, before them).

    Creates a group with ``rows`` (n, dim) float32 in chunks of ``chunk_rows`` rows and
    ``digests`` (n_chunks, 32) uint8 with one zarr chunk per row chunk. Nothing happens if the
    round is already complete.
    """
    round = check_round(round, "features round")
    if is_complete(location, features_path(round)):
        return
    path = writing_path(location, round, writer)
    with store_io(location, f"prepare features round {round}"):
        # A stale attempt of this writer may hold digests of a different bank: never mix it with
        # this one. (Only its own: other writers' staging is never touched here.)
        location.remove(path)
        group = zarr.create_group(location.zarr_store, path=path, attributes={
            "round": round, "n": n, "dim": dim, "chunk_rows": chunk_rows, "complete": False})
        group.create_array(ROWS, shape=(n, dim), chunks=(chunk_rows, dim), dtype="float32",
                           fill_value=0.0, config={"write_empty_chunks": True})
        # Uncompressed: 32 bytes do not compress, and a flipped byte stays a readable wrong digest.
        group.create_array(DIGESTS, shape=(n_chunks(n, chunk_rows), DIGEST_SIZE),
                           chunks=(1, DIGEST_SIZE), dtype="uint8", fill_value=0,
                           compressors=None, config={"write_empty_chunks": True})


def write_feature_chunks(location: Location, n: int, dim: int, chunk_rows: int, round: int,
                         bank: np.ndarray, rank: int, world_size: int, writer: str) -> int:
    """Write the row chunks c with ``c % world_size == rank`` of ``bank`` (n, dim) float32.

    Each chunk is followed by its digest, so a present digest always means its rows are in the
    store. Returns the number of chunks written (0 if the round is already complete).
    """
    round = check_round(round, "features round")
    rank, world_size = check_rank(rank, world_size)
    check_array("bank", bank, (n, dim), "float32")
    if is_complete(location, features_path(round)):
        return 0
    path = writing_path(location, round, writer)
    try:
        rows = zarr.open_array(location.zarr_store, path=f"{path}/{ROWS}", mode="r+")
        digests = zarr.open_array(location.zarr_store, path=f"{path}/{DIGESTS}", mode="r+")
    except (OSError, ValueError) as err:
        raise StoreError(f"features round {round} was not prepared in store {location.url}: "
                         f"call prepare_features({round}) on one process before the writers"
                         ) from err
    written = 0
    with store_io(location, f"write features round {round}"):
        for chunk in range(rank, n_chunks(n, chunk_rows), world_size):
            start, stop = chunk_bounds(chunk, n, chunk_rows)
            block = bank[start:stop]
            rows[start:stop] = block
            digests[chunk] = np.frombuffer(chunk_digest(block), dtype=np.uint8)
            # Each writer makes its own chunks durable (ranks on other machines of a shared
            # filesystem): complete_features may then trust every digest it finds.
            location.sync(chunk_key(f"{path}/{ROWS}", chunk, 2), chunk_key(f"{path}/{DIGESTS}", chunk, 2))
            written += 1
    return written


def complete_features(location: Location, round: int, writer: str) -> str:
    """Check every chunk digest is present, record the checksum, make the snapshot visible.

    Returns the snapshot checksum (hex). Idempotent: a complete round returns its checksum.
    """
    round = check_round(round, "features round")
    final = features_path(round)
    if is_complete(location, final):
        return node_attrs(location, final)["checksum"]
    path = writing_path(location, round, writer)
    try:
        group = zarr.open_group(location.zarr_store, path=path, mode="r+")
        recorded = group[DIGESTS][...]
    except (OSError, ValueError, KeyError) as err:
        raise StoreError(f"features round {round} was never prepared and written in store "
                         f"{location.url}: run prepare_features and write_feature_chunks first"
                         ) from err
    digests = [row.tobytes() for row in recorded]
    missing = [c for c, digest in enumerate(digests) if digest == MISSING]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (f" ... ({len(missing)} in all)"
                                                     if len(missing) > 20 else "")
        raise StoreError(f"features round {round} is missing chunks {shown} of {len(digests)}: "
                         f"chunk c is written by rank c % world_size; did every rank finish?")
    checksum = combine(digests)
    # How the arrays decode, as written: every reader compares their zarr.json with it.
    decoding = {name: decoding_metadata(group[name]) for name in (ROWS, DIGESTS)}
    with store_io(location, f"complete features round {round}"):
        # The digests go into the attrs too: readers verify chunks without reading `digests`.
        mark_complete(location, path, {"checksum": checksum, "digest": DIGEST_NAME, "digests": to_hex(digests),
                                       "decoding": decoding})
        if location.is_local and not location.rename(path, final):
            # Someone completed it concurrently; theirs is the published one.
            location.remove(path)
            return node_attrs(location, final)["checksum"]
    return checksum


def remove_dead_staging(location: Location, writer: str) -> list[str]:
    """Remove every feature staging directory not of ``writer``; returns their paths.

    Only for the holder of the store's writer lease (then every other writer is dead: what it
    staged will never be completed). Object stores stage nothing: [] there.
    """
    if not location.is_local:
        return []
    removed = []
    for name in location.list_dir(FEATURES):
        staged = parse_staging_name(name)
        if staged is not None and staged[1] != writer:
            with store_io(location, "remove a dead writer's feature staging"):
                location.remove(f"{FEATURES}/{name}")
            removed.append(f"{FEATURES}/{name}")
    return removed


def complete_feature_rounds(location: Location) -> list[int]:
    """Rounds whose snapshot is complete, ascending."""
    rounds = (parse_round_name(name) for name in location.list_dir(FEATURES))
    return [r for r in rounds if r is not None and is_complete(location, features_path(r))]


class FeatureReader:
    """Reads a complete snapshot in row ranges, verifying every chunk it touches.

    ``read(start, stop)`` returns (stop - start, dim) float32; a chunk whose contents do not
    match the digest recorded at completion raises StoreError naming the chunk.
    """

    def __init__(self, location: Location, round: int, attrs: dict) -> None:
        self.round = round
        self.n = int(attrs["n"])
        self.dim = int(attrs["dim"])
        self.chunk_rows = int(attrs["chunk_rows"])
        self.checksum = str(attrs["checksum"])
        self._path = f"{features_path(round)}/{ROWS}"
        self._digests = recorded_digests(features_path(round), attrs)
        self._rows = open_recorded_array(location, self._path, recorded_decoding(attrs, ROWS),
                                         self._digests)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as (stop - start, dim) float32."""
        if not (isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))
                and 0 <= start <= stop <= self.n):
            raise StoreError(f"row range [{start}, {stop}) is outside features round "
                             f"{self.round}, which has rows [0, {self.n})")
        return read_verified(self._rows, self._path, self._digests, self.chunk_rows,
                             int(start), int(stop))

    def read_all(self) -> np.ndarray:
        """The whole bank, (n, dim) float32."""
        return self.read(0, self.n)

    def __repr__(self) -> str:
        return (f"FeatureReader(round={self.round}, n={self.n}, dim={self.dim}, "
                f"checksum={self.checksum[:12]}...)")


def feature_reader(location: Location, round: int) -> FeatureReader:
    round = check_round(round, "features round")
    attrs = node_attrs(location, features_path(round))
    if attrs is None and (damage := unreadable_node(location, features_path(round))):
        raise StoreError(f"features round {round} cannot be opened: {damage}")
    if not attrs or attrs.get("complete") is not True:
        have = complete_feature_rounds(location)
        raise StoreError(f"features round {round} is not complete in store {location.url} "
                         f"(complete rounds: {have or 'none'}): wait for training round "
                         f"{round} to finish")
    try:
        return FeatureReader(location, round, attrs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StoreError(f"features round {round} in store {location.url} is damaged "
                         f"({type(err).__name__}: {one_line(err)}): `nbr-index inspect` "
                         f"shows what is wrong") from err

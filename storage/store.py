"""The Store: opening/creating a store and the public API over its parts.

``Store`` holds where the store is and its root attrs (``StoreInfo``); the work is done by
one module per concern: snapshots (features), neighbourhoods, labels, verify, describe.
"""

from __future__ import annotations

import numbers
import uuid
from dataclasses import dataclass, replace

import numpy as np
import zarr

from storage import describe as _describe
from storage import labels as _labels
from storage import neighbourhoods as _nbr
from storage import snapshots as _snap
from storage import verify as _verify
from storage.checksums import rows_checksum
from storage.errors import StoreError
from storage.layout import (DEFAULT_CHUNK_ROWS, FEATURES, LABELS, NEIGHBOURHOODS, SCHEMA_VERSION,
                            TMP_PREFIX, WRITER_LEASE, WRITER_LEASE_LOCK, is_writer_id)
from storage.lease import LeaseWatch, WriterLease
from storage.location import Location, one_line, open_location
from storage.publish import node_attrs, store_io
from storage.validate import check_array, check_readable, check_root_attrs, check_round, jsonable

#: Keys the trainer's curriculum must carry.
CURRICULUM_KEYS = ("rounds", "k", "tau", "mode")


@dataclass(frozen=True)
class StoreInfo:
    """The root attrs: what the store was created for."""

    n: int               # samples (rows of every per-sample array)
    dim: int             # feature dimension d
    dataset_id: str
    chunk_rows: int      # rows per chunk
    schema_version: int
    curriculum: dict | None   # {"rounds", "k", "tau", "mode"[, "selection", "max_anchor_fraction", "neighbour_features"]} by the trainer, or None

    def to_attrs(self) -> dict:
        return {"schema_version": self.schema_version, "n": self.n, "dim": self.dim,
                "dataset_id": self.dataset_id, "chunk_rows": self.chunk_rows,
                "curriculum": self.curriculum}


class Store:
    """A Zarr v3 store of feature snapshots and neighbourhood rounds (layout: storage.layout).

    Create with :meth:`create_or_open` (trainer) or :meth:`open` (everything else).
    """

    def __init__(self, location: Location, info: StoreInfo) -> None:
        self._location = location
        self.info = info
        self.url = location.url
        # Names this handle's feature staging; unique unless a run gives its ranks one (write_as).
        self.writer = uuid.uuid4().hex
        self._lease: WriterLease | LeaseWatch | None = None

    def write_as(self, writer: str, lease: WriterLease | LeaseWatch | None = None) -> "Store":
        """Write feature snapshots as ``writer`` (a training run's id: its ranks share it, so they
        fill one staging snapshot together) and, given the ``lease`` this process holds (or its
        launcher's, watched), check before every write that the run still holds it (StoreError
        otherwise). Returns self."""
        if not is_writer_id(writer):
            raise StoreError(f"writer id must be 1-64 letters, digits, '_', '.' or '-', got {writer!r}")
        self.writer, self._lease = writer, lease
        return self

    def _may_write(self) -> None:
        if self._lease is not None:
            self._lease.check()

    def remove_dead_staging(self) -> list[str]:
        """Remove the feature staging of every other writer (killed runs); returns their paths.
        Only for the holder of the writer lease: no other writer is alive then."""
        self._may_write()
        return _snap.remove_dead_staging(self._location, self.writer)

    # ----------------------------------------------------------------- opening
    @classmethod
    def create_or_open(cls, url: str, n: int, dim: int, dataset_id: str,
                       curriculum: dict | None = None,
                       chunk_rows: int = DEFAULT_CHUNK_ROWS) -> "Store":
        """Create the store, or open it if it exists and was created for the same n, dim, dataset.

        A mismatch raises StoreError naming both values. ``curriculum`` (None: keep the recorded
        one) is recorded; once a neighbourhood round is published, a different one is refused
        (those rounds were selected with the recorded one). ``chunk_rows`` applies on creation
        only.
        """
        for name, value in (("n", n), ("dim", dim), ("chunk_rows", chunk_rows)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise StoreError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(dataset_id, str) or not dataset_id:
            raise StoreError(f"dataset_id must be a non-empty string, got {dataset_id!r}")
        curriculum = _check_curriculum(curriculum)
        location = open_location(url)
        wanted = StoreInfo(n=int(n), dim=int(dim), dataset_id=dataset_id,
                           chunk_rows=int(chunk_rows), schema_version=SCHEMA_VERSION,
                           curriculum=curriculum)
        if not location.exists("zarr.json"):
            _refuse_foreign_directory(location)
            try:
                with store_io(location, "create the store"):
                    # Root attrs first and complete: a store with a zarr.json is a whole store.
                    zarr.create_group(location.zarr_store, attributes=wanted.to_attrs())
            except zarr.errors.ContainsGroupError:
                pass   # another process (rank) created it meanwhile: open and compare below
            else:
                return cls._ready(location, wanted)

        store = cls._open_location(location)
        store.check_matches(wanted.n, wanted.dim, wanted.dataset_id)
        have = store.info
        if curriculum is not None and curriculum != have.curriculum:
            if have.curriculum is not None and _nbr.published_rounds(location):
                raise StoreError(f"store {url} was created for curriculum {have.curriculum}, "
                                 f"this run has {curriculum}: its published neighbourhood rounds "
                                 f"follow the former; use another --store or the same settings")
            # Nothing was selected with the recorded curriculum yet: this run's replaces it.
            with store_io(location, "record the curriculum"):
                root = zarr.open_group(location.zarr_store, mode="r+")
                root.attrs.update({"curriculum": curriculum})
            store.info = replace(have, curriculum=curriculum)
        return cls._ready(location, store.info)

    def check_matches(self, n: int, dim: int, dataset_id: str) -> None:
        """StoreError naming both values if this store was created for another n, dim or dataset."""
        wanted = {"n": n, "dim": dim, "dataset_id": dataset_id}
        for name, value in wanted.items():
            have = getattr(self.info, name)
            if have != value:
                raise StoreError(f"store {self.url} was created for {name}={have!r}, "
                                 f"this run has {name}={value!r}: use another --store or the same dataset")

    @classmethod
    def _ready(cls, location: Location, info: StoreInfo) -> "Store":
        """Make sure the parent groups exist (idempotent; several ranks may race here)."""
        with store_io(location, "create the store"):
            for group in (FEATURES, NEIGHBOURHOODS):
                if not location.exists(f"{group}/zarr.json"):
                    try:
                        zarr.create_group(location.zarr_store, path=group)
                    except zarr.errors.ContainsGroupError:
                        pass   # created by another rank since we looked
        return cls(location, info)

    @classmethod
    def open(cls, url: str) -> "Store":
        """Open an existing store; StoreError if there is none at ``url``."""
        return cls._open_location(open_location(url))

    @classmethod
    def _open_location(cls, location: Location) -> "Store":
        url = location.url
        check_readable(location, ("", FEATURES, NEIGHBOURHOODS))
        if not location.exists("zarr.json"):
            raise StoreError(f"no store at {url}: check the --store path "
                             f"(`trainer run` creates the store)")
        attrs = node_attrs(location, "")
        if attrs is None:
            raise StoreError(f"{url}/zarr.json cannot be read: the store is damaged")
        if "schema_version" not in attrs:
            raise StoreError(f"{url} is a zarr hierarchy but not an AND store "
                             f"(no schema_version attribute): check the --store path")
        check_root_attrs(url, attrs)
        if attrs["schema_version"] > SCHEMA_VERSION:
            raise StoreError(f"store {url} has schema version {attrs['schema_version']}, this "
                             f"code reads up to {SCHEMA_VERSION}: upgrade and-nbr")
        if isinstance(attrs["schema_version"], int) and attrs["schema_version"] < SCHEMA_VERSION:
            # Its digests do not cover the arrays' decoding metadata: what it returns cannot be trusted.
            raise StoreError(f"store {url} was written by an older and-nbr (schema version "
                             f"{attrs['schema_version']}, this code reads {SCHEMA_VERSION}), whose "
                             f"checksums do not cover how its arrays decode: train again into a new "
                             f"--store (or write one with `trainer embed --store`)")
        try:
            info = StoreInfo(n=int(attrs["n"]), dim=int(attrs["dim"]),
                             dataset_id=str(attrs["dataset_id"]),
                             chunk_rows=int(attrs["chunk_rows"]),
                             schema_version=int(attrs["schema_version"]),
                             curriculum=attrs.get("curriculum"))
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"{url}/zarr.json lacks a valid {one_line(err)} attribute: "
                             f"the store is damaged") from err
        return cls(location, info)

    def __repr__(self) -> str:
        return (f"Store({self.url!r}, n={self.info.n}, dim={self.info.dim}, "
                f"dataset_id={self.info.dataset_id!r})")

    # ------------------------------------------------------------------ labels
    def write_labels(self, labels: np.ndarray) -> None:
        """labels: (N,) int64, for reporting neighbourhood consistency only."""
        self._may_write()
        _labels.write_labels(self._location, self.info.n, self.info.chunk_rows, labels)

    def read_labels(self) -> np.ndarray | None:
        """(N,) int64, or None if the store has no labels."""
        return _labels.read_labels(self._location)

    # -------------------------------------------------------- feature snapshots
    def prepare_features(self, round: int) -> None:
        """One process (rank 0), before the writers: an empty snapshot for ``round``."""
        self._may_write()
        _snap.prepare_features(self._location, self.info.n, self.info.dim,
                               self.info.chunk_rows, round, self.writer)

    def write_feature_chunks(self, round: int, bank: np.ndarray, rank: int,
                             world_size: int) -> int:
        """bank: (N, d) float32, the whole memory bank; writes the chunks c with
        c % world_size == rank and their digests; returns the number of chunks written
        (0 if the round is already complete: a complete snapshot is never overwritten)."""
        self._may_write()
        return _snap.write_feature_chunks(self._location, self.info.n, self.info.dim,
                                          self.info.chunk_rows, round, bank, rank, world_size, self.writer)

    def complete_features(self, round: int) -> str:
        """One process, after all writers: check, record the checksum, make visible."""
        self._may_write()
        return _snap.complete_features(self._location, round, self.writer)

    def write_features(self, round: int, bank: np.ndarray) -> str:
        """Single-process write of a whole snapshot; returns its checksum."""
        # Check the input before prepare_features touches the store.
        check_round(round, "features round")
        check_array("bank", bank, (self.info.n, self.info.dim), "float32")
        self.prepare_features(round)
        self.write_feature_chunks(round, bank, 0, 1)
        return self.complete_features(round)

    def features_checksum(self, rows: np.ndarray) -> str:
        """The checksum features/round-r records once ``rows`` (N, d) float32 is written as it,
        computed in memory (O(N d), nothing read): what a run compares a snapshot or a round's
        ``source_checksum`` with to know they are its own."""
        check_array("rows", rows, (self.info.n, self.info.dim), "float32")
        return rows_checksum(rows, self.info.chunk_rows)

    def feature_reader(self, round: int) -> _snap.FeatureReader:
        return _snap.feature_reader(self._location, round)

    def complete_feature_rounds(self) -> list[int]:
        return _snap.complete_feature_rounds(self._location)

    def latest_complete_features(self) -> int | None:
        rounds = self.complete_feature_rounds()
        return rounds[-1] if rounds else None

    # ------------------------------------------------------ neighbourhood rounds
    def publish_neighbourhoods(self, round: int, neighbours: np.ndarray, entropy: np.ndarray,
                               anchor: np.ndarray, attrs: dict) -> bool:
        """neighbours (N, k) int64, entropy (N,) float32, anchor (N,) bool; atomic to readers;
        False (nothing changed) if the round is already published."""
        self._may_write()
        return _nbr.publish_neighbourhoods(self._location, self.info.n, self.info.chunk_rows,
                                           round, neighbours, entropy, anchor, attrs)

    def read_neighbourhoods(self, round: int) -> _nbr.Neighbourhoods:
        return _nbr.read_neighbourhoods(self._location, round)

    def published_rounds(self) -> list[int]:
        return _nbr.published_rounds(self._location)

    def latest_published_round(self) -> int | None:
        rounds = self.published_rounds()
        return rounds[-1] if rounds else None

    def record_index_failure(self, round: int, error: str) -> None:
        """The index process: rebuilding ``round`` raised ``error`` (a one-line message)."""
        _nbr.record_failure(self._location, round, one_line(error))

    def index_failure(self, round: int) -> str | None:
        """The error recorded for ``round`` by the index, or None (no failure recorded)."""
        return _nbr.recorded_failure(self._location, round)

    def clear_index_failure(self, round: int) -> None:
        _nbr.clear_failure(self._location, round)

    # ---------------------------------------------------------------- reporting
    def verify(self) -> _verify.VerifyReport:
        """Recompute every chunk digest and checksum; the report names corrupted chunks."""
        return _verify.verify_store(self._location, self.info)

    def describe(self) -> dict:
        """JSON-able summary of what the store holds (see storage.describe)."""
        return _describe.describe_store(self._location, self.info)


def _check_curriculum(curriculum: object) -> dict | None:
    if curriculum is None:
        return None
    if not isinstance(curriculum, dict):
        raise StoreError(f"curriculum must be a dict with {', '.join(CURRICULUM_KEYS)}, "
                         f"got {type(curriculum).__name__}")
    missing = [key for key in CURRICULUM_KEYS if key not in curriculum]
    if missing:
        raise StoreError(f"curriculum lacks {', '.join(missing)} "
                         f"(required: {', '.join(CURRICULUM_KEYS)})")
    # As it will read back from zarr.json, so that a reopened store compares equal.
    return jsonable(curriculum, "curriculum")


def _refuse_foreign_directory(location: Location) -> None:
    """Refuse to turn a directory holding unrelated files into a store."""
    ours = {"zarr.json", FEATURES, NEIGHBOURHOODS, LABELS, WRITER_LEASE, WRITER_LEASE_LOCK}
    # zarr writes zarr.json via a temporary "zarr.json.<uuid>.partial" file: a rank creating the
    # store concurrently may have one in flight.
    foreign = [name for name in location.list_dir("")
               if name not in ours and not name.startswith(("zarr.json.", TMP_PREFIX))]
    if foreign:
        raise StoreError(f"{location.url} holds other files ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}) but no store: "
                         f"use an empty or new directory for --store")


def check_store_writable(url: str) -> None:
    """StoreError (one line) if this process could not create or write a store at ``url``: a
    directory holding other files but no store, a read-only file system, no permission, a path
    under a regular file. Tried, not guessed (root ignores permission bits); leaves nothing."""
    location = open_location(url)
    if not location.exists("zarr.json"):
        _refuse_foreign_directory(location)
    problem = location.write_problem()
    if problem is not None:
        raise StoreError(f"store {url} cannot be written ({problem}): use a writable --store")

"""The store layout: every node name and path in one place.

A store is a Zarr v3 hierarchy in a local directory (the default) or at any fsspec URL zarr
accepts (``s3://bucket/run``, ``memory://x``). Nothing outside ``storage/`` knows these names.

```
<store>/zarr.json                        root group; attrs: schema_version, n, dim, dataset_id,
                                         chunk_rows, curriculum {rounds, k, tau, mode[, selection,
                                         max_anchor_fraction, neighbour_features]} (or null)
<store>/labels                           optional (N,) int64 array, for reporting neighbourhood
                                         consistency only (never training); attrs: complete,
                                         digests (one per chunk), checksum, decoding
<store>/features/round-0002/             memory bank after training round 2 (group; with curriculum
                                         neighbour_features "backbone": the network's normalised
                                         backbone features of the un-augmented images, dim = F);
                                         attrs: round, n, dim, chunk_rows, complete, checksum,
                                         digest, digests, decoding
    rows                                 (N, d) float32, chunks of chunk_rows rows (default 8192),
                                         zstd; chunk c holds rows [c*chunk_rows, (c+1)*chunk_rows)
    digests                              (n_chunks, 32) uint8, uncompressed, one zarr chunk per
                                         feature chunk: blake2b-256 of that chunk's little-endian
                                         float32 bytes, written by the rank that owns the chunk
                                         (chunk c belongs to rank c % world_size); all zero = not
                                         written yet
<store>/neighbourhoods/round-0003/       used by training round 3, computed from features round 2
                                         (group); attrs: round, k, tau, fraction, mode, selection,
                                         max_anchor_fraction, neighbour_features, mutual_fraction,
                                         stable_fraction (from round 2), source_features_round,
                                         backend, seconds,
                                         consistency and pair_consistency (if known),
                                         found_consistency (selection oracle), anchors,
                                         complete, checksum, digest, digests, decoding
    neighbours                           (N, k) int64, chunks of chunk_rows rows
    entropy                              (N,) float32
    anchor                               (N,) bool
<store>/neighbourhoods/.failed-round-0003  written by `nbr-index serve` when rebuilding round 3
                                         raised (group; attrs: round, error): the trainer waiting
                                         for that round stops with the error instead of waiting
                                         out its timeout; removed when a rebuild of it starts
<store>/writer-lease.json                the training run writing the store (storage.lease): JSON
                                         {format, version, owner, run_dir, host, pid, started,
                                         heartbeat}; absent when no run writes it
<store>/.writer-lease.lock               local stores: an empty file whose flock serialises the
                                         lease's takers and its heartbeat
```

Checksums (storage.checksums): a chunk digest is blake2b-256 over the chunk's dtype and shape, then
its little-endian bytes (C order); a snapshot/round checksum is blake2b-256 over its ordered chunk
digests (for neighbourhoods: the neighbours digests, then entropy, then anchor). Completed nodes
keep their chunk digests as hex in their attrs (``digests``) so readers and ``verify`` can name a
corrupted chunk, and the decoding metadata of each array (``decoding``: shape, data type, chunk
grid, chunk key encoding, fill value, codecs, as its zarr.json had them when written), which every
reader compares with the array's zarr.json when it opens the array.

Publishing. A reader only ever sees a node whose attrs say ``complete: true``, even if the
writer is SIGKILLed at any instant:

* local directory: the node is written under a hidden staging name in the same parent
  (``features/.staging-round-0002-<writer>``, the writer being the training run's id, shared by
  its ranks; ``neighbourhoods/.tmp-round-0003-<uuid>``, ``.tmp-labels-<uuid>``) with
  ``complete: true`` written last, then ``os.rename``d into place (atomic on POSIX). Leftover
  staging directories of killed writers are ignored by readers; a writer wipes only its own
  (the next ``prepare_features`` of the same writer), the next run removes dead writers' feature
  staging once it holds the writer lease (``remove_dead_staging``), and neighbourhood staging is
  removed once the round is published.
* other fsspec stores (object stores have no atomic rename): the node is written in place with
  ``complete: false`` and the group ``zarr.json`` is rewritten with ``complete: true`` last (a
  single object put). An incomplete node left by a killed writer is overwritten by the next
  publish.
"""

from __future__ import annotations

import re

#: Bumped when the layout changes incompatibly; readers refuse newer schemas, and older ones
#: (2: chunk digests name dtype and shape, nodes record their arrays' decoding metadata).
SCHEMA_VERSION = 2

#: Rows per chunk of every per-sample array (features, neighbourhoods, labels).
DEFAULT_CHUNK_ROWS = 8192

FEATURES = "features"
NEIGHBOURHOODS = "neighbourhoods"
LABELS = "labels"

ROWS = "rows"            # features/round-r/rows
DIGESTS = "digests"      # features/round-r/digests
NEIGHBOUR_ARRAYS = ("neighbours", "entropy", "anchor")   # order fixes the round checksum

WRITER_LEASE = "writer-lease.json"        # the training run writing the store (storage.lease)
WRITER_LEASE_LOCK = ".writer-lease.lock"  # local stores: flock'd by whoever reads-and-writes the lease

_ROUND_NAME = re.compile(r"^round-(\d{4,})$")
STAGING_PREFIX = ".staging-"   # features: one name per (round, writer), shared by the writer's ranks
TMP_PREFIX = ".tmp-"           # single-writer nodes: unique per publish attempt
FAILED_PREFIX = ".failed-"     # a rebuild's error, for the trainer waiting on that round

#: What a writer id (in staging names) may be: a file name on every store. The round's digits
#: end at the first '-', so the id is everything after it.
_WRITER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STAGING_NAME = re.compile(r"^\.staging-round-(\d{4,})-(.+)$")


def round_name(round: int) -> str:
    """``2 -> 'round-0002'``; zero-padded so names sort like numbers up to round 9999."""
    return f"round-{round:04d}"


def parse_round_name(name: str) -> int | None:
    """``'round-0002' -> 2``; None for anything else (staging names, stray files)."""
    match = _ROUND_NAME.match(name)
    return int(match.group(1)) if match else None


def features_path(round: int) -> str:
    return f"{FEATURES}/{round_name(round)}"


def is_writer_id(writer: object) -> bool:
    """A writer id fit for a staging name: 1-64 of ``A-Z a-z 0-9 _ . -``, starting alphanumeric."""
    return isinstance(writer, str) and _WRITER_ID.match(writer) is not None


def features_staging_path(round: int, writer: str) -> str:
    """Where the ranks of ``writer`` write a snapshot before it is renamed into place (local
    stores only): ``features/.staging-round-0002-<writer>``; never another writer's."""
    return f"{FEATURES}/{STAGING_PREFIX}{round_name(round)}-{writer}"


def parse_staging_name(name: str) -> tuple[int, str] | None:
    """``'.staging-round-0002-ab12' -> (2, 'ab12')``; None for anything else. Names of the
    earlier layout (``.staging-round-0002``, one shared by every writer) give (2, '')."""
    if name.startswith(STAGING_PREFIX) and parse_round_name(name[len(STAGING_PREFIX):]) is not None:
        return parse_round_name(name[len(STAGING_PREFIX):]), ""
    match = _STAGING_NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def neighbourhoods_path(round: int) -> str:
    return f"{NEIGHBOURHOODS}/{round_name(round)}"


def failure_path(round: int) -> str:
    """``3 -> 'neighbourhoods/.failed-round-0003'`` (hidden: never taken for a round)."""
    return f"{NEIGHBOURHOODS}/{FAILED_PREFIX}{round_name(round)}"


def tmp_path(final_path: str, unique: str) -> str:
    """A single writer's private staging path next to ``final_path`` (local stores only).

    ``neighbourhoods/round-0003`` -> ``neighbourhoods/.tmp-round-0003-<unique>``.
    """
    parent, _, name = final_path.rpartition("/")
    staged = f"{TMP_PREFIX}{name}-{unique}"
    return f"{parent}/{staged}" if parent else staged


def tmp_prefix(final_path: str) -> str:
    """The name prefix shared by every staging directory of ``final_path`` (for clean-up)."""
    return f"{TMP_PREFIX}{final_path.rpartition('/')[2]}-"


def n_chunks(n: int, chunk_rows: int) -> int:
    """Number of row chunks covering ``n`` rows (the last one may be short)."""
    return -(-n // chunk_rows)


def chunk_bounds(chunk: int, n: int, chunk_rows: int) -> tuple[int, int]:
    """Row range ``[start, stop)`` of row chunk ``chunk``."""
    start = chunk * chunk_rows
    return start, min(start + chunk_rows, n)


def chunk_key(array_path: str, chunk: int, ndim: int) -> str:
    """The store key of row chunk ``chunk`` of a row-chunked array, used to name it in reports.

    Zarr v3 default chunk key encoding: ``features/round-0002/rows`` chunk 3 -> ``.../rows/c/3/0``
    (2-D arrays have a single chunk along the columns).
    """
    return "/".join([array_path, "c", str(chunk)] + ["0"] * (ndim - 1))

"""Digests of what is read: chunk values, node checksums, and the metadata that decodes them.

What a digest covers, and why it is split in two:

* A **chunk digest** is blake2b-256 over a header naming the chunk's dtype (little-endian form)
  and shape, then its values as little-endian bytes in C order. It describes the decoded chunk -
  which numbers, of which type, in which shape - and not how they were encoded, so a snapshot
  written by 8 ranks and one written by a single process have the same digests, and a bank still
  in memory has the checksum its snapshot will have (``rows_checksum``).
* A **node checksum** is blake2b-256 over the node's ordered chunk digests.
* The **decoding metadata** of each array (``DECODING_KEYS`` of its ``zarr.json``: shape, data
  type, chunk grid and key encoding, fill value, codecs with their byte order and compressor) is
  recorded in the node's attrs when the node is completed and compared with the array's
  ``zarr.json`` every time a reader opens the array (``open_recorded_array``) and by ``verify``.
  It is kept beside the checksum rather than folded into it because it depends on the codec
  and zarr's spelling of it, which the in-memory checksum cannot know.

So an edited ``"data_type"`` (which would decode the same bytes as other numbers), chunk shape,
codec or byte order is refused on every read path with one line naming the array and the field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

import numpy as np
import zarr

from storage.errors import StoreError
from storage.layout import chunk_bounds, chunk_key, n_chunks
from storage.location import Location, one_line

DIGEST_NAME = "blake2b-256"
DIGEST_SIZE = 32   # bytes
MISSING = bytes(DIGEST_SIZE)   # all zero: the digests array's fill value, "not written yet"

#: The entries of an array's zarr.json that decide how its chunk files decode into values.
DECODING_KEYS = ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs",
                 "storage_transformers")


def chunk_digest(block: np.ndarray) -> bytes:
    """blake2b-256 of ``block``'s dtype and shape, then its values as little-endian bytes in C
    order (32 bytes)."""
    dtype = block.dtype.newbyteorder("<")
    canonical = np.ascontiguousarray(block, dtype=dtype)
    hasher = hashlib.blake2b(f"{dtype.str}{tuple(block.shape)};".encode(), digest_size=DIGEST_SIZE)
    hasher.update(canonical.data)
    return hasher.digest()


def row_chunk_digests(array: np.ndarray, chunk_rows: int) -> list[bytes]:
    """The digest of every row chunk of ``array`` (shape (N, ...)), in chunk order."""
    n = array.shape[0]
    return [chunk_digest(array[slice(*chunk_bounds(c, n, chunk_rows))])
            for c in range(n_chunks(n, chunk_rows))]


def combine(digests: Iterable[bytes]) -> str:
    """A node checksum: blake2b-256 (hex) over its ordered chunk digests."""
    hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for digest in digests:
        hasher.update(digest)
    return hasher.hexdigest()


def rows_checksum(array: np.ndarray, chunk_rows: int) -> str:
    """The checksum a single-array node holding ``array`` (N, ...) in chunks of ``chunk_rows``
    rows has in the store (a feature snapshot, the labels), computed from memory: one pass of
    blake2b over the array, O(N d)."""
    return combine(row_chunk_digests(array, chunk_rows))


def to_hex(digests: Iterable[bytes]) -> list[str]:
    return [d.hex() for d in digests]


def from_hex(digests: Iterable[str]) -> list[bytes]:
    return [bytes.fromhex(d) for d in digests]


# ---------------------------------------------------------------- decoding metadata
def decoding_metadata(array) -> dict:
    """The ``DECODING_KEYS`` of a zarr ``array``'s metadata, as plain JSON values (lists, not
    tuples), as zarr reads them: what is recorded at write time and compared at every open."""
    document = array.metadata.to_dict()
    return {key: json.loads(json.dumps(document.get(key), default=str)) for key in DECODING_KEYS}


def decoding_differences(array, recorded: object) -> list[str]:
    """What differs between ``array``'s decoding metadata and ``recorded`` (one short phrase per
    field, e.g. ``data_type is "int32" but was "float32" when written``); [] if nothing does."""
    if not isinstance(recorded, dict):
        return [f"no decoding metadata was recorded for it (found {_shown(recorded)})"]
    actual = decoding_metadata(array)
    return [f"{key} is {_shown(actual[key])} but was {_shown(recorded.get(key))} when written"
            for key in DECODING_KEYS if _canonical(actual[key]) != _canonical(recorded.get(key))]


def recorded_decoding(attrs: dict, name: str | None = None) -> object:
    """The decoding metadata a complete node's attrs record for its array ``name`` (None: the
    node is the array itself, as the labels are); None if there is none."""
    decoding = attrs.get("decoding")
    if name is None or not isinstance(decoding, dict):
        return decoding
    return decoding.get(name)


def open_recorded_array(location: Location, path: str, recorded: object,
                        digests: list[bytes] | None = None):
    """Open the array at ``path`` read-only after checking its zarr.json against the decoding
    metadata ``recorded`` when it was written (and, when given, that ``digests`` has one digest
    per row chunk). Raises StoreError, one line naming the array and what differs."""
    try:
        array = zarr.open_array(location.zarr_store, path=path, mode="r")
    except Exception as err:   # missing, unparsable or undecodable metadata: zarr raises many kinds
        raise StoreError(f"{path}/zarr.json in store {location.url} cannot be read or decoded "
                         f"({_why(err)}): the array's metadata is damaged; `nbr-index inspect` "
                         f"verifies the whole store") from err
    differences = decoding_differences(array, recorded)
    if differences:
        raise StoreError(f"{path}/zarr.json in store {location.url} does not match the metadata "
                         f"recorded when the array was written ({'; '.join(differences)}): it was "
                         f"edited or damaged, and its chunks would decode as other values; "
                         f"`nbr-index inspect` verifies the whole store")
    if digests is not None and len(digests) != n_chunks(array.shape[0], array.chunks[0]):
        raise StoreError(f"{path} in store {location.url} has {n_chunks(array.shape[0], array.chunks[0])} "
                         f"chunks but {len(digests)} recorded digests: its node's zarr.json is damaged")
    return array


def recorded_digests(node: str, attrs: dict, names: tuple[str, ...] | None = None):
    """The chunk digests a complete node's ``attrs`` record (a list; a dict of lists by array
    name when ``names`` is given), after checking that they reproduce its recorded checksum.
    StoreError naming the node's zarr.json if they are missing, malformed or do not."""
    try:
        if names is None:
            digests = from_hex(attrs["digests"])
            ordered = digests
        else:
            digests = {name: from_hex(attrs["digests"][name]) for name in names}
            ordered = [d for name in names for d in digests[name]]
        checksum = attrs["checksum"]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StoreError(f"{node}/zarr.json: its chunk digests or checksum are missing or "
                         f"malformed ({_why(err)}): the node's metadata is damaged; "
                         f"`nbr-index inspect` verifies the whole store") from err
    if combine(ordered) != checksum:
        raise StoreError(f"{node}/zarr.json: the recorded checksum does not match the recorded "
                         f"chunk digests: the node's metadata is damaged; `nbr-index inspect` "
                         f"verifies the whole store")
    return digests


def unreadable_node(location: Location, path: str) -> str | None:
    """Why the node at ``path`` has a zarr.json that cannot be read (one line), or None when it
    has none or it reads: tells a damaged node from an absent one in readers' messages."""
    if not location.exists(f"{path}/zarr.json"):
        return None
    try:
        zarr.open(location.zarr_store, path=path, mode="r")
    except Exception as err:   # JSONDecodeError, ValueError, KeyError, ... from zarr
        return (f"{path}/zarr.json in store {location.url} exists but cannot be read or decoded "
                f"({_why(err)}): its metadata is damaged; `nbr-index inspect` verifies the whole store")
    return None


# ------------------------------------------------------------------------- values
def read_verified(array, array_path: str, digests: list[bytes], chunk_rows: int,
                  start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a row-chunked zarr ``array``, checking each chunk's digest.

    Whole chunks are read (a digest covers a whole chunk) and the requested rows sliced out.
    ``array_path`` names the array in errors (``features/round-0002/rows``). Raises StoreError
    naming the first chunk that cannot be decoded or does not match its digest.
    """
    if stop <= start:
        return np.empty((0,) + tuple(array.shape[1:]), dtype=array.dtype)
    n = array.shape[0]
    first, last = start // chunk_rows, n_chunks(stop, chunk_rows)   # chunks [first, last)
    lo, hi = first * chunk_rows, min(last * chunk_rows, n)
    try:
        data = array[lo:hi]
    except Exception:
        # One bad chunk fails the whole read: read chunk by chunk to name the bad one.
        data = np.concatenate([_read_chunk(array, array_path, c, n, chunk_rows)
                               for c in range(first, last)])
    for c in range(first, last):
        c_start, c_stop = chunk_bounds(c, n, chunk_rows)
        if chunk_digest(data[c_start - lo:c_stop - lo]) != digests[c]:
            raise StoreError(f"{chunk_key(array_path, c, array.ndim)} is corrupted: its contents "
                             f"do not match the digest recorded when it was written "
                             f"(`nbr-index inspect` verifies the whole store)")
    return data[start - lo:stop - lo]


def _read_chunk(array, array_path: str, chunk: int, n: int, chunk_rows: int) -> np.ndarray:
    try:
        return array[slice(*chunk_bounds(chunk, n, chunk_rows))]
    except Exception as err:   # codecs raise anything from ValueError to RuntimeError
        raise StoreError(f"{chunk_key(array_path, chunk, array.ndim)} is corrupted: it cannot be "
                         f"read or decoded ({_why(err)})") from err


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _shown(value: object) -> str:
    text = _canonical(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {one_line(err)}"[:200]

"""Chunk digests and node checksums (blake2b-256).

A digest covers exactly the values of one row chunk, in little-endian C order, so it does not
depend on the codec, the chunk file's compression or the machine that wrote it: a snapshot written
by 8 ranks and one written by a single process have the same checksum.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

from storage.errors import StoreError
from storage.layout import chunk_bounds, chunk_key, n_chunks

DIGEST_NAME = "blake2b-256"
DIGEST_SIZE = 32   # bytes
MISSING = bytes(DIGEST_SIZE)   # all zero: the digests array's fill value, "not written yet"


def chunk_digest(block: np.ndarray) -> bytes:
    """blake2b-256 of ``block``'s values as little-endian bytes in C order (32 bytes)."""
    canonical = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
    return hashlib.blake2b(canonical.data, digest_size=DIGEST_SIZE).digest()


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


def to_hex(digests: Iterable[bytes]) -> list[str]:
    return [d.hex() for d in digests]


def from_hex(digests: Iterable[str]) -> list[bytes]:
    return [bytes.fromhex(d) for d in digests]


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
        why = f"{type(err).__name__}: {' '.join(str(err).split())}"
        raise StoreError(f"{chunk_key(array_path, chunk, array.ndim)} is corrupted: it cannot be "
                         f"read or decoded ({why})") from err

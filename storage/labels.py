"""Dataset labels, (N,) int64, kept only to report neighbourhood class consistency.

Training never reads them. Written once per store; a second write of the same labels is a no-op,
different labels are refused (the dataset id fixes them).
"""

from __future__ import annotations

import numpy as np
import zarr

from storage.checksums import (DIGEST_NAME, combine, decoding_metadata, open_recorded_array,
                               read_verified, recorded_decoding, recorded_digests, row_chunk_digests,
                               to_hex, unreadable_node)
from storage.errors import StoreError
from storage.layout import LABELS
from storage.location import Location
from storage.publish import is_complete, mark_complete, node_attrs, publish_node, store_io
from storage.validate import check_array


def write_labels(location: Location, n: int, chunk_rows: int, labels: np.ndarray) -> None:
    check_array("labels", labels, (n,), "int64")
    digests = row_chunk_digests(labels, chunk_rows)
    checksum = combine(digests)
    if is_complete(location, LABELS):
        if node_attrs(location, LABELS).get("checksum") != checksum:
            raise StoreError(f"store {location.url} already holds different labels for this "
                             f"dataset: use another --store")
        return

    def write(path: str) -> None:
        stored = zarr.create_array(location.zarr_store, name=path, shape=(n,),
                                   chunks=(chunk_rows,), dtype="int64", fill_value=0,
                                   attributes={"complete": False},
                                   config={"write_empty_chunks": True})
        stored[...] = labels
        mark_complete(location, path, {"checksum": checksum, "digest": DIGEST_NAME, "digests": to_hex(digests),
                                       "decoding": decoding_metadata(stored)})

    with store_io(location, "write labels"):
        publish_node(location, LABELS, write)


def read_labels(location: Location) -> np.ndarray | None:
    """(N,) int64, or None if the store has no (complete) labels; StoreError if they are damaged
    (their zarr.json unreadable or edited, a chunk corrupted)."""
    attrs = node_attrs(location, LABELS)
    if attrs is None and (damage := unreadable_node(location, LABELS)):
        raise StoreError(f"the labels cannot be opened: {damage}")
    if not attrs or attrs.get("complete") is not True:
        return None
    digests = recorded_digests(LABELS, attrs)
    with store_io(location, "read labels"):
        # The labels are an array node: the decoding metadata is recorded in its own attrs.
        stored = open_recorded_array(location, LABELS, recorded_decoding(attrs), digests)
        return read_verified(stored, LABELS, digests, stored.chunks[0], 0, stored.shape[0])

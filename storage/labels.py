"""Dataset labels, (N,) int64, kept only to report neighbourhood class consistency.

Training never reads them. Written once per store; a second write of the same labels is a no-op,
different labels are refused (the dataset id fixes them).
"""

from __future__ import annotations

import numpy as np
import zarr

from storage.checksums import (DIGEST_NAME, combine, from_hex, read_verified, row_chunk_digests,
                               to_hex)
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
        mark_complete(location, path, {"checksum": checksum, "digest": DIGEST_NAME, "digests": to_hex(digests)})

    with store_io(location, "write labels"):
        publish_node(location, LABELS, write)


def read_labels(location: Location) -> np.ndarray | None:
    """(N,) int64, or None if the store has no (complete) labels."""
    attrs = node_attrs(location, LABELS)
    if not attrs or attrs.get("complete") is not True:
        return None
    with store_io(location, "read labels"):
        stored = zarr.open_array(location.zarr_store, path=LABELS, mode="r")
        return read_verified(stored, LABELS, from_hex(attrs["digests"]), stored.chunks[0],
                             0, stored.shape[0])

"""The AND store: feature snapshots and neighbourhood rounds in Zarr v3 (layout: storage.layout).

The only package that knows the store layout. Public API::

    from storage import Store, StoreInfo, FeatureReader, Neighbourhoods, VerifyReport
    from storage import format_description, UserError, StoreError
    from storage import check_store_writable, take_writer_lease, watch_writer_lease, read_writer_lease
    from storage import WriterLease, LeaseWatch, LeaseHeld, LeaseLost     # one writer: storage.lease
"""

from storage.describe import format_description
from storage.errors import StoreError, UserError
from storage.layout import DEFAULT_CHUNK_ROWS, SCHEMA_VERSION
from storage.lease import (LeaseHeld, LeaseLost, LeaseWatch, WriterLease, read_writer_lease, take_writer_lease,
                           watch_writer_lease)
from storage.neighbourhoods import Neighbourhoods
from storage.snapshots import FeatureReader
from storage.store import Store, StoreInfo, check_store_writable
from storage.verify import VerifyReport

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "FeatureReader",
    "LeaseHeld",
    "LeaseLost",
    "LeaseWatch",
    "Neighbourhoods",
    "SCHEMA_VERSION",
    "Store",
    "StoreError",
    "StoreInfo",
    "UserError",
    "VerifyReport",
    "WriterLease",
    "check_store_writable",
    "format_description",
    "read_writer_lease",
    "take_writer_lease",
    "watch_writer_lease",
]

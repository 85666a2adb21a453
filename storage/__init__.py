"""The AND store: feature snapshots and neighbourhood rounds in Zarr v3 (layout: storage.layout).

The only package that knows the store layout. Public API::

    from storage import Store, StoreInfo, FeatureReader, Neighbourhoods, VerifyReport
    from storage import format_description, UserError, StoreError
"""

from storage.describe import format_description
from storage.errors import StoreError, UserError
from storage.layout import DEFAULT_CHUNK_ROWS, SCHEMA_VERSION
from storage.neighbourhoods import Neighbourhoods
from storage.snapshots import FeatureReader
from storage.store import Store, StoreInfo
from storage.verify import VerifyReport

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "FeatureReader",
    "Neighbourhoods",
    "SCHEMA_VERSION",
    "Store",
    "StoreError",
    "StoreInfo",
    "UserError",
    "VerifyReport",
    "format_description",
]

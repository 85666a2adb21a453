"""Making a node visible to readers all at once (see the "Publishing" section of layout.py).

A node (group or array) is *complete* when its attrs say ``complete: true``; writers set that
last, readers on every store type require it. On a local directory the node is additionally
built under a staging name and renamed into place, so even its half-written files never appear
under the final name.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from typing import Callable, Iterator

import zarr

from storage.errors import StoreError
from storage.layout import tmp_path, tmp_prefix
from storage.location import Location, one_line

# What zarr raises for a node that is absent (NodeNotFoundError is a FileNotFoundError) or whose
# zarr.json cannot be parsed (JSONDecodeError is a ValueError).
_UNREADABLE = (OSError, ValueError, KeyError, TypeError)


@contextmanager
def store_io(location: Location, action: str) -> Iterator[None]:
    """Turn an OS-level failure (permissions, full disk, ...) into a one-line StoreError."""
    try:
        yield
    except StoreError:
        raise
    except OSError as err:
        raise StoreError(f"cannot {action} in store {location.url}: {one_line(err)}") from err


def node_attrs(location: Location, path: str) -> dict | None:
    """The attrs of the group or array at ``path``; None if it is absent or unreadable.

    Readers treat an unreadable node like an absent one; ``verify`` reports it by name.
    """
    try:
        return dict(zarr.open(location.zarr_store, path=path, mode="r").attrs)
    except _UNREADABLE:
        return None


def is_complete(location: Location, path: str) -> bool:
    attrs = node_attrs(location, path)
    return bool(attrs and attrs.get("complete") is True)


def mark_complete(location: Location, path: str, attrs: dict) -> None:
    """The last write of every node: its data made durable, then ``attrs`` with ``complete:
    true`` written (what makes it visible to readers), then that marker made durable. The order
    is what lets a reader trust ``complete`` after a power loss: never a marker before its data."""
    location.sync(path)
    zarr.open(location.zarr_store, path=path, mode="r+").attrs.update({**attrs, "complete": True})
    location.sync(f"{path}/zarr.json")


def publish_node(location: Location, final: str, write: Callable[[str], None]) -> bool:
    """Write a single-writer node with ``write(path)`` and make it visible at ``final``.

    ``write`` must create the node at the path it is given with ``complete: false`` and end with
    :func:`mark_complete`. On local disk the node is then renamed into place (durably). Returns
    False, writing nothing, if ``final`` is already complete (or another publisher completes it
    first); True if this call published it.
    """
    if is_complete(location, final):
        remove_stale_tmps(location, final)
        return False
    if not location.is_local:
        # No atomic rename: overwrite whatever a killed writer left, in place; readers wait for
        # the complete flag that `write` sets last.
        location.remove(final)
        write(final)
        return True

    staged = tmp_path(final, uuid.uuid4().hex)   # unique: concurrent publishers never share it
    moved = False
    try:
        try:
            write(staged)
        except Exception:
            if is_complete(location, final):
                # A concurrent publisher won and removed our staging directory under us.
                return False
            raise
        if location.exists(final) and not is_complete(location, final):
            location.remove(final)   # debris at the final name, not made by this protocol
        moved = location.rename(staged, final)
    finally:
        if not moved:
            location.remove(staged)
    remove_stale_tmps(location, final)
    return moved


def remove_stale_tmps(location: Location, final: str) -> None:
    """Remove staging directories of ``final`` left by killed writers, once ``final`` is complete.

    Only then is it safe: a concurrent publisher still writing one of them will find ``final``
    taken when it renames, and gives up (its rename fails, it returns False).
    """
    if not location.is_local:
        return
    parent = final.rpartition("/")[0]
    prefix = tmp_prefix(final)
    for name in location.list_dir(parent):
        if name.startswith(prefix):
            try:
                location.remove(f"{parent}/{name}" if parent else name)
            except OSError:
                # A concurrent publisher still writes into it (rmtree meets entries it adds):
                # its write fails, it finds ``final`` complete and removes its own staging. The
                # node is published either way: its clean-up must not fail the publish.
                continue

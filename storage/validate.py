"""Input checks, run before anything is written so that bad input leaves the store unchanged.

Each failure is a one-line StoreError that names the argument, what was expected and what came.
Storage checks shapes, dtypes and index ranges; the values themselves (NaN features, ...) are the
caller's business.
"""

from __future__ import annotations

import errno
import json
import math
import numbers

import numpy as np

from storage.errors import StoreError


def check_round(round: object, what: str, minimum: int = 0) -> int:
    """``round`` as an int >= ``minimum``; ``what`` names it in the message ("features round")."""
    if isinstance(round, bool) or not isinstance(round, numbers.Integral):
        raise StoreError(f"{what} must be an integer >= {minimum}, got {round!r}")
    if round < minimum:
        raise StoreError(f"{what} must be >= {minimum}, got {round}")
    return int(round)


def check_rank(rank: object, world_size: object) -> tuple[int, int]:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise StoreError(f"{name} must be an integer, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise StoreError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def check_array(name: str, array: object, shape: tuple, dtype: str) -> np.ndarray:
    """``array`` must be a numpy array of exactly ``shape`` (None = any size) and ``dtype``."""
    if not isinstance(array, np.ndarray):
        raise StoreError(f"{name} must be a numpy array (e.g. tensor.cpu().numpy()), "
                         f"got {type(array).__name__}")
    expected = np.dtype(dtype)
    if array.dtype != expected:
        raise StoreError(f"{name} must have dtype {expected}, got {array.dtype}")
    if array.ndim != len(shape) or any(want is not None and got != want
                                       for got, want in zip(array.shape, shape)):
        wanted = "(" + ", ".join("?" if s is None else str(s) for s in shape) + \
                 ("," if len(shape) == 1 else "") + ")"
        raise StoreError(f"{name} must have shape {wanted}, got {tuple(array.shape)}")
    return array


def check_index_range(name: str, array: np.ndarray, n: int) -> None:
    """Every value of an index array must address a row: 0 <= value < n."""
    if array.size and (array.min() < 0 or array.max() >= n):
        raise StoreError(f"{name} must hold row indices in [0, {n}), "
                         f"got values in [{array.min()}, {array.max()}]")


def jsonable(value: object, name: str) -> object:
    """``value`` with numpy scalars/arrays turned into Python ones; StoreError if not JSON-able.

    Attributes are stored in zarr.json, so they must survive a JSON round trip unchanged.
    """
    def convert(item):
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                raise TypeError("keys must be strings")
            return {k: convert(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [convert(v) for v in item]
        if isinstance(item, np.ndarray):
            return convert(item.tolist())
        if isinstance(item, np.generic):
            return item.item()
        if isinstance(item, float) and not math.isfinite(item):
            raise TypeError(f"non-finite float {item}")
        return item

    try:
        converted = convert(value)
        json.dumps(converted, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(f"{name} must be JSON-serialisable: {err}") from err
    return converted


def check_readable(location, paths: tuple[str, ...]) -> None:
    """StoreError (one line) unless every directory of ``paths`` (relative to the store root, ""
    for the root) can be listed: a store whose root or round folders cannot be read (no
    permission, a symbolic link loop, an I/O error) is refused, rather than reported as holding
    nothing (or failing with a traceback) by ``verify``, ``describe`` and the readers."""
    for path in paths:
        try:
            location.list_dir(path)
        except OSError as err:
            where = f"{location.url}/{path}" if path else location.url
            fix = {errno.EACCES: "give this user read access to the whole store",
                   errno.EPERM: "give this user read access to the whole store",
                   errno.ELOOP: "a symbolic link there leads back to itself: fix or remove it"}
            raise StoreError(f"store {where} cannot be read ({err.strerror or type(err).__name__}): "
                             f"{fix.get(err.errno, 'check the --store path and the disk')}") from None


def check_root_attrs(url: str, attrs: dict) -> None:
    """The root attrs of the store at ``url`` must be what ``Store.create_or_open`` writes: a
    hand-edited or damaged zarr.json is refused in one line before anything compares, divides or
    indexes with them (a string schema_version once failed a comparison with a traceback, and
    chunk_rows 0 passed ``verify`` as ok)."""
    def damaged(problem: str) -> StoreError:
        return StoreError(f"{url}/zarr.json {problem}: the store is damaged (recreate it, or restore zarr.json)")

    for name in ("schema_version", "n", "dim", "chunk_rows"):
        if name not in attrs:
            raise damaged(f"lacks the {name} attribute")
        value = attrs[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise damaged(f"has {name} = {value!r}, expected a positive integer")
    dataset_id = attrs.get("dataset_id")
    if not isinstance(dataset_id, str) or not dataset_id:
        raise damaged(f"has dataset_id = {dataset_id!r}, expected a non-empty string")
    curriculum = attrs.get("curriculum")
    if curriculum is not None and not isinstance(curriculum, dict):
        raise damaged(f"has curriculum = {curriculum!r}, expected a mapping or null")

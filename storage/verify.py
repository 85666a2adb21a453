"""Re-reading every complete node and checking it against the digests recorded when it was written.

Each problem is one line that starts with the store key at fault, e.g.
``features/round-0002/rows/c/3/0: contents do not match the recorded digest`` or
``neighbourhoods/round-0001/neighbours/zarr.json: data_type is "float64" but was "int64" when written``
(an array's decoding metadata is compared with what its node recorded when it was written).
A chunk that cannot even be decoded (a flipped byte in a compressed chunk often breaks the
codec) is reported the same way. Verification reads one chunk at a time, so memory stays at one
chunk whatever N is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from storage.checksums import chunk_digest, combine, decoding_differences, recorded_decoding
from storage.layout import (DIGESTS, FEATURES, LABELS, NEIGHBOUR_ARRAYS, NEIGHBOURHOODS, ROWS,
                            chunk_bounds, chunk_key, features_path, n_chunks,
                            neighbourhoods_path, parse_round_name)
from storage.location import Location, one_line


@dataclass
class VerifyReport:
    """``problems``: one line per fault, naming the chunk/file; ``checked``: nodes verified."""

    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": list(self.problems), "checked": list(self.checked)}


def verify_store(location: Location, info) -> VerifyReport:
    """Verify labels, every complete feature snapshot and every published neighbourhood round."""
    report = VerifyReport()
    if location.exists(LABELS):
        attrs = _attrs(location, LABELS, report)
        if attrs is not None and _is_checkable(location, LABELS, attrs, report):
            digests = _recorded_digests(LABELS, attrs, report)
            if digests is not None:
                _verify_array(location, LABELS, digests, (info.n,), "int64", recorded_decoding(attrs),
                              report)
            report.checked.append(LABELS)

    for round in _rounds(location, FEATURES):
        path = features_path(round)
        attrs = _attrs(location, path, report)
        if attrs is None or not _is_checkable(location, path, attrs, report):
            continue
        digests = _recorded_digests(path, attrs, report)
        if digests is not None:
            _verify_array(location, f"{path}/{ROWS}", digests, (info.n, info.dim), "float32",
                          recorded_decoding(attrs, ROWS), report)
            _verify_digest_records(location, f"{path}/{DIGESTS}", digests,
                                   recorded_decoding(attrs, DIGESTS), report)
        report.checked.append(path)

    for round in _rounds(location, NEIGHBOURHOODS):
        path = neighbourhoods_path(round)
        attrs = _attrs(location, path, report)
        if attrs is None or not _is_checkable(location, path, attrs, report):
            continue
        digests = _recorded_digests(path, attrs, report, NEIGHBOUR_ARRAYS)
        if digests is not None:
            shapes = {"neighbours": ((info.n, attrs.get("k")), "int64"),
                      "entropy": ((info.n,), "float32"), "anchor": ((info.n,), "bool")}
            for name in NEIGHBOUR_ARRAYS:
                shape, dtype = shapes[name]
                _verify_array(location, f"{path}/{name}", digests[name], shape, dtype,
                              recorded_decoding(attrs, name), report)
        report.checked.append(path)
    return report


def _rounds(location: Location, parent: str) -> list[int]:
    rounds = (parse_round_name(name) for name in location.list_dir(parent))
    return sorted(r for r in rounds if r is not None)


def _attrs(location: Location, path: str, report: VerifyReport) -> dict | None:
    try:
        return dict(zarr.open(location.zarr_store, path=path, mode="r").attrs)
    except Exception as err:   # missing or unparsable zarr.json: report, keep going
        report.problems.append(f"{path}/zarr.json: cannot be read ({_why(err)})")
        return None


def _is_checkable(location: Location, path: str, attrs: dict, report: VerifyReport) -> bool:
    """Complete nodes are checked. An incomplete one under a final name is a fault on local disk
    (nodes arrive there by rename, complete) and a publish in progress elsewhere."""
    if attrs.get("complete") is True:
        return True
    if location.is_local:
        report.problems.append(f"{path}: present but not marked complete")
    return False


def _recorded_digests(path: str, attrs: dict, report: VerifyReport, names=None):
    """The chunk digests recorded in the attrs (a list, or a dict of lists when ``names``), after
    checking that they reproduce the recorded checksum; None if they cannot be trusted."""
    try:
        if names is None:
            digests = [bytes.fromhex(d) for d in attrs["digests"]]
            ordered = digests
        else:
            digests = {name: [bytes.fromhex(d) for d in attrs["digests"][name]] for name in names}
            ordered = [d for name in names for d in digests[name]]
        checksum = attrs["checksum"]
    except (KeyError, TypeError, ValueError) as err:
        report.problems.append(f"{path}/zarr.json: chunk digests or checksum missing or "
                               f"malformed ({_why(err)})")
        return None
    if combine(ordered) != checksum:
        report.problems.append(f"{path}/zarr.json: the recorded checksum does not match the "
                               f"recorded chunk digests")
        return None
    return digests


def _verify_array(location: Location, path: str, digests: list[bytes], shape: tuple,
                  dtype: str, decoding: object, report: VerifyReport) -> None:
    array = _open_recorded(location, path, decoding, report)
    if array is None:
        return
    if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
        report.problems.append(f"{path}: holds {array.dtype} {tuple(array.shape)}, "
                               f"expected {dtype} {tuple(shape)}")
        return
    n, chunk_rows = array.shape[0], array.chunks[0]
    if len(digests) != n_chunks(n, chunk_rows):
        report.problems.append(f"{path}: {n_chunks(n, chunk_rows)} chunks but "
                               f"{len(digests)} recorded digests")
        return
    for chunk, recorded in enumerate(digests):
        key = chunk_key(path, chunk, array.ndim)
        try:
            block = array[slice(*chunk_bounds(chunk, n, chunk_rows))]
        except Exception as err:   # codecs raise anything from ValueError to RuntimeError
            report.problems.append(f"{key}: cannot be decoded ({_why(err)})")
            continue
        if chunk_digest(block) != recorded:
            report.problems.append(f"{key}: contents do not match the recorded digest")


def _verify_digest_records(location: Location, path: str, digests: list[bytes], decoding: object,
                           report: VerifyReport) -> None:
    """The per-chunk digests the ranks wrote must equal those recorded at completion."""
    array = _open_recorded(location, path, decoding, report)
    if array is None:
        return
    if array.shape[0] != len(digests):
        report.problems.append(f"{path}: {array.shape[0]} digests, expected {len(digests)}")
        return
    for chunk, recorded in enumerate(digests):
        key = chunk_key(path, chunk, array.ndim)
        try:
            written = array[chunk].tobytes()
        except Exception as err:
            report.problems.append(f"{key}: cannot be decoded ({_why(err)})")
            continue
        if written != recorded:
            report.problems.append(f"{key}: differs from the digest recorded at completion")


def _open_recorded(location: Location, path: str, decoding: object, report: VerifyReport):
    """The array at ``path``, or None after reporting that its zarr.json cannot be read or differs
    from the decoding metadata recorded when it was written (its chunks would decode wrongly)."""
    try:
        array = zarr.open_array(location.zarr_store, path=path, mode="r")
    except Exception as err:
        report.problems.append(f"{path}/zarr.json: cannot be read ({_why(err)})")
        return None
    differences = decoding_differences(array, decoding)
    if differences:
        report.problems.append(f"{path}/zarr.json: {'; '.join(differences)}")
        return None
    return array


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {one_line(err)}"[:200]

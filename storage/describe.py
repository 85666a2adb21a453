"""What a store holds: a JSON-able dict (``describe_store``) and text (``format_description``).

``nbr-index inspect`` prints ``format_description(store.describe(), store.verify())``;
``inspect --json`` can dump the dict itself.
"""

from __future__ import annotations

from storage.layout import (FEATURES, LABELS, NEIGHBOURHOODS, STAGING_PREFIX, TMP_PREFIX,
                            features_path, neighbourhoods_path, parse_round_name)
from storage.location import Location
from storage.publish import node_attrs

#: Bulky or internal attrs left out of the description.
_HIDDEN = ("digests", "digest", "decoding")


def describe_store(location: Location, info) -> dict:
    """A JSON-able summary:

    ``{"url", "schema_version", "n", "dim", "dataset_id", "chunk_rows", "curriculum",
    "labels": bool, "features": [{"round", "complete", "checksum"?}...],
    "neighbourhoods": [{"round", "complete", <attrs>...}...], "leftovers": [paths]}``

    ``features``/``neighbourhoods`` list every round found, complete or not, ascending;
    ``leftovers`` are staging directories (a publish in progress or a killed writer's).
    """
    features = []
    for round in _rounds(location, FEATURES):
        attrs = node_attrs(location, features_path(round)) or {}
        entry = {"round": round, "complete": attrs.get("complete") is True}
        if entry["complete"]:
            entry["checksum"] = attrs.get("checksum")
        features.append(entry)

    neighbourhoods = []
    for round in _rounds(location, NEIGHBOURHOODS):
        attrs = node_attrs(location, neighbourhoods_path(round)) or {}
        shown = {key: value for key, value in attrs.items() if key not in _HIDDEN}
        neighbourhoods.append({**shown, "round": round, "complete": attrs.get("complete") is True})

    leftovers = [f"{parent}/{name}" for parent in (FEATURES, NEIGHBOURHOODS)
                 for name in location.list_dir(parent)
                 if name.startswith((STAGING_PREFIX, TMP_PREFIX))]
    leftovers += [name for name in location.list_dir("") if name.startswith(TMP_PREFIX)]

    labels = node_attrs(location, LABELS)
    return {
        "url": location.url,
        "schema_version": info.schema_version,
        "n": info.n,
        "dim": info.dim,
        "dataset_id": info.dataset_id,
        "chunk_rows": info.chunk_rows,
        "curriculum": info.curriculum,
        "labels": bool(labels and labels.get("complete") is True),
        "features": features,
        "neighbourhoods": neighbourhoods,
        "leftovers": leftovers,
    }


def _rounds(location: Location, parent: str) -> list[int]:
    rounds = (parse_round_name(name) for name in location.list_dir(parent))
    return sorted(r for r in rounds if r is not None)


def format_description(d: dict, verify_report=None) -> str:
    """Readable multi-line text of a ``describe_store`` dict (and a VerifyReport, if given)."""
    lines = [f"store {d['url']}  (schema {d['schema_version']})",
             f"  dataset     {d['dataset_id']}  n={d['n']}  dim={d['dim']}  "
             f"chunk_rows={d['chunk_rows']}"]
    curriculum = d.get("curriculum")
    if curriculum:
        lines.append("  curriculum  " + "  ".join(f"{k}={v}" for k, v in curriculum.items()))
    else:
        lines.append("  curriculum  (not recorded)")
    lines.append(f"  labels      {'yes' if d.get('labels') else 'no'}")

    lines.append("features (memory bank after training round r)")
    if not d["features"]:
        lines.append("  none yet")
    for entry in d["features"]:
        state = (f"complete  checksum {entry['checksum'][:16]}" if entry["complete"]
                 else "incomplete")
        lines.append(f"  round {entry['round']:>3}  {state}")

    lines.append("neighbourhoods (used by training round r)")
    if not d["neighbourhoods"]:
        lines.append("  none yet")
    for entry in d["neighbourhoods"]:
        lines.append(f"  round {entry['round']:>3}  " + _neighbourhood_line(entry, d["n"]))

    if d.get("leftovers"):
        lines.append("staging leftovers (a publish in progress, or a killed writer's; harmless)")
        lines.extend(f"  {path}" for path in d["leftovers"])

    if verify_report is not None:
        if verify_report.ok:
            lines.append(f"verify: ok ({len(verify_report.checked)} nodes checked)")
        else:
            lines.append(f"verify: {len(verify_report.problems)} problem(s) "
                         f"in {len(verify_report.checked)} nodes checked")
            lines.extend(f"  {problem}" for problem in verify_report.problems)
    return "\n".join(lines)


def _neighbourhood_line(entry: dict, n: int) -> str:
    if not entry["complete"]:
        return "incomplete"
    parts = [f"from features {entry.get('source_features_round', '?')}",
             f"k={entry.get('k', '?')}", f"tau={entry.get('tau', '?')}",
             f"mode={entry.get('mode', '?')}"]
    if isinstance(entry.get("anchors"), int) and n:
        parts.append(f"anchors {entry['anchors']} ({100.0 * entry['anchors'] / n:.1f}%)")
    if isinstance(entry.get("consistency"), (int, float)):
        parts.append(f"consistency {entry['consistency']:.1f}%")
    if isinstance(entry.get("found_consistency"), (int, float)):  # selection oracle: before its replacement
        parts.append(f"found {entry['found_consistency']:.1f}%")
    parts.append(f"backend {entry.get('backend', '?')}")
    if isinstance(entry.get("seconds"), (int, float)):
        parts.append(f"{entry['seconds']:.1f} s")
    if entry.get("checksum"):
        parts.append(f"checksum {entry['checksum'][:16]}")
    return "  ".join(parts)

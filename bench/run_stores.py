"""What the benchmarks that read finished runs' stores share: which stores (--store, globs or
repeated) and where their rows go as JSON (--json-out)."""
from __future__ import annotations

import glob
import json

import click


def store_options(command):
    """Add --store (into ``store_patterns``) and --json-out to a click command."""
    command = click.option("--json-out", default=None, help="also write every store's rows as JSON here")(command)
    return click.option("--store", "store_patterns", multiple=True, required=True,
                        help="the store of a finished run (holds its labels); a glob, or repeated, "
                             "for several runs")(command)


def store_urls(patterns: tuple[str, ...]) -> list[str]:
    """The stores the patterns name, sorted, each once (a pattern no glob matches stands for itself)."""
    return sorted({url for pattern in patterns for url in (glob.glob(pattern) or [pattern])})


def write_rows(path: str | None, per_store: dict) -> None:
    """Write {store url: rows} as JSON to ``path``, where one is given."""
    if path:
        with open(path, "w") as fh:
            json.dump(per_store, fh, indent=1)

"""Progress reporting for long rebuilds: a callable that prints one stderr line every few seconds."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class StderrProgress:
    """progress(done, total) -> prints '<label>: 42.0% (done/total), 12 s elapsed, ~16 s left'.

    Prints at most every ``every_seconds`` (and once at 100%), so it can be called per block.
    """

    def __init__(self, label: str, every_seconds: float = 5.0, stream: TextIO | None = None):
        self.label, self.every_seconds = label, every_seconds
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()
        self.last_printed = self.started
        self.finished = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        finished = total > 0 and done >= total
        if not finished:
            self.finished = False  # a new phase (the FAISS backends have two) may start over
        if (finished and self.finished) or (not finished and now - self.last_printed < self.every_seconds):
            return  # ... and each phase's 100% line is printed once
        self.finished = finished
        self.last_printed = now
        elapsed = now - self.started
        fraction = done / total if total else 1.0
        left = f", ~{elapsed * (1 - fraction) / fraction:.0f} s left" if 0 < fraction < 1 else ""
        print(
            f"{self.label}: {100 * fraction:.1f}% ({done}/{total}), {elapsed:.0f} s elapsed{left}",
            file=self.stream,
            flush=True,
        )

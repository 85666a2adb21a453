"""Progress of long work (an epoch's steps, embedding a dataset): a tqdm bar on a terminal, log
lines elsewhere.

Where stderr is a terminal, :class:`Progress` draws a tqdm bar that it removes when done (the
caller's summary line follows). Elsewhere (``docker compose`` logs, CI, a file) a bar's carriage
returns would be noise, so it sends one plain line through the caller's log function at most
every ``every_s`` seconds, the format the trainer has always logged::

    <label> <done>/<total>  <postfix>
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# Plain progress lines inside one long piece of work at most this often (seconds).
PLAIN_EVERY_S = 30.0


def on_terminal(stream: TextIO | None = None) -> bool:
    """True where ``stream`` (default stderr, where tqdm draws) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """``total`` units of work labelled ``label``; call :meth:`update` as units finish, then
    :meth:`close`. ``enabled=False`` (ranks other than 0) shows nothing. ``terminal`` forces the
    bar (True) or the plain lines (False); None asks :func:`on_terminal`."""

    def __init__(self, total: int, label: str, log: Callable[[str], None] = print, *, unit: str = "step",
                 enabled: bool = True, terminal: bool | None = None, every_s: float = PLAIN_EVERY_S,
                 stream: TextIO | None = None):
        self.total, self.label, self.log, self.every_s = total, label, log, every_s
        self.enabled = enabled
        self.done = 0
        self.bar = None
        self.last_line = time.perf_counter()
        if enabled and (on_terminal(stream) if terminal is None else terminal):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit=unit, leave=False, dynamic_ncols=True,
                            file=sys.stderr if stream is None else stream)

    def update(self, n: int = 1, postfix: str | Callable[[], str] = "") -> None:
        """``n`` more units done; ``postfix`` (text, or a function giving it, called only when
        shown) follows the count, e.g. the current images/s."""
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix_str(postfix() if callable(postfix) else postfix, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last_line > self.every_s:
            self.last_line = now
            text = postfix() if callable(postfix) else postfix
            self.log(f"{self.label} {self.done}/{self.total}" + (f"  {text}" if text else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

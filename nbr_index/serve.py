"""``nbr-index serve``: watch a store and rebuild each round as soon as its features are complete.

Round r (1..R) is rebuilt when features/round-(r-1) is complete and neighbourhoods/round-r is not
published yet. All state lives in the store, so the service is idempotent: restarting it (even
after SIGKILL mid-round) recomputes only unpublished rounds, and storage's atomic publish means a
round is either fully visible or absent. SIGTERM/SIGINT abandon the rebuild in progress at the
next block boundary (nothing is published) and exit cleanly; the next start recomputes it.
A ready file, if asked for, exists exactly while the service watches an open store (a container
healthcheck tests for it).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from storage import Store, StoreError

from .errors import InvalidParameterError, RebuildCancelled
from .progress import StderrProgress
from .rebuild import rebuild, store_curriculum

log = logging.getLogger("nbr_index.serve")


@dataclass
class ServeOutcome:
    """published: rounds this process published; stopped: True if ended by a signal."""

    published: list[int]
    stopped: bool


def serve(
    store_url: str,
    *,
    poll_seconds: float = 5.0,
    once: bool = False,
    wait_for_store: bool | None = None,
    until_round: int | None = None,
    progress_seconds: float = 30.0,
    stall_seconds: float = 0.0,
    ready_file: str | None = None,
    **rebuild_options,
) -> ServeOutcome:
    """Rebuild rounds of the store at ``store_url`` until round ``until_round`` is published.

    until_round: last round to serve (default: the curriculum's R). once: do what can be done now,
    then return. wait_for_store: wait for the store to be created (default: unless ``once``). rebuild_options go to :func:`nbr_index.rebuild` (k, tau, mode, backend, ...).
    stall_seconds: test hook, sleep this long at the start of each rebuild (to kill it mid-round).
    ready_file: a path created once the store is open and watched, and removed on return.
    """
    if poll_seconds <= 0:
        raise InvalidParameterError(f"poll seconds must be positive, got {poll_seconds}")
    stop = threading.Event()
    published: list[int] = []
    with _stop_on_signals(stop), _ready_file(ready_file) as mark_ready:
        wait = not once if wait_for_store is None else wait_for_store
        store = _wait_for_store(store_url, poll_seconds, wait, stop)
        if store is None:
            return ServeOutcome(published, stopped=True)
        last = _last_round(store, until_round, rebuild_options.get("rounds"))
        log.info("serving %s: rounds 1..%d, polling every %.1f s", store.url, last, poll_seconds)
        mark_ready()
        while not stop.is_set():
            done = set(store.published_rounds())
            if all(r in done for r in range(1, last + 1)):
                log.info("round %d is published: all rounds up to %d done, exiting", last, last)
                return ServeOutcome(published, stopped=False)
            ready = set(store.complete_feature_rounds())
            for round in range(1, last + 1):
                if round in done or (round - 1) not in ready or stop.is_set():
                    continue
                result = _rebuild_one(store, round, stop, progress_seconds, stall_seconds, rebuild_options)
                if result is None:
                    break  # abandoned by a signal
                if result.published:
                    published.append(round)
                log.info("%s", result.summary())
            if once:
                return ServeOutcome(published, stopped=stop.is_set())
            stop.wait(poll_seconds)
    log.info("stopped by signal; published this run: %s", published or "none")
    return ServeOutcome(published, stopped=True)


def _rebuild_one(store: Store, round: int, stop: threading.Event, progress_seconds: float,
                 stall_seconds: float, rebuild_options: dict):
    """Rebuild one round; None if a signal abandoned it (nothing was published)."""
    log.info("features round %d is complete: rebuilding neighbourhood round %d", round - 1, round)
    report = StderrProgress(f"round {round}", every_seconds=progress_seconds)
    stalled = [stall_seconds <= 0]

    def progress(done: int, total: int) -> None:
        if not stalled[0]:
            stalled[0] = True
            stop.wait(stall_seconds)
        if stop.is_set():
            raise RebuildCancelled(f"round {round} abandoned")
        report(done, total)

    try:
        return rebuild(store, round, progress=progress, **rebuild_options)
    except RebuildCancelled:
        log.info("signal received: round %d abandoned before publishing (a restart redoes it)", round)
        return None


def _wait_for_store(url: str, poll_seconds: float, wait: bool, stop: threading.Event) -> Store | None:
    """Open the store; if ``wait``, wait for the trainer to create it (None if stopped meanwhile)."""
    announced = False
    while True:
        try:
            return Store.open(url)
        except StoreError:
            if not wait:
                raise
            if not announced:
                log.info("no store at %s yet: waiting for the trainer to create it", url)
                announced = True
        if stop.wait(poll_seconds):
            return None


def _last_round(store: Store, until_round: int | None, rounds: int | None) -> int:
    total = rounds or store_curriculum(store)["rounds"]
    last = total if until_round is None else until_round
    if not 1 <= last <= total:
        raise InvalidParameterError(f"--until-round must be in 1..{total} (the curriculum's R), got {last}")
    return last


@contextmanager
def _ready_file(path: str | None):
    """Yield a function that creates ``path``; ``path`` is absent before it is called (a file left
    by a killed run is removed first) and after the block."""
    def remove() -> None:
        if path is not None and os.path.lexists(path):
            os.remove(path)

    def mark_ready() -> None:
        if path is not None:
            open(path, "w").close()

    remove()
    try:
        yield mark_ready
    finally:
        remove()


@contextmanager
def _stop_on_signals(stop: threading.Event):
    """SIGTERM/SIGINT set ``stop`` (a second one exits at once); handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def handle(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("received %s: finishing up", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def configure_logging() -> None:
    """Timestamped lines on stderr, for the CLI."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s nbr-index serve: %(message)s")

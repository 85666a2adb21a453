"""``nbr-index serve``: watch a store and rebuild each round as soon as its features are complete.

Round r (1..R) is rebuilt when features/round-(r-1) is complete and neighbourhoods/round-r is not
published yet. All state lives in the store, so the service is idempotent: restarting it (even
after SIGKILL mid-round) recomputes only unpublished rounds, and storage's atomic publish means a
round is either fully visible or absent. SIGTERM/SIGINT abandon the rebuild in progress at the
next block boundary (nothing is published) and exit cleanly; the next start recomputes it.
Curriculum options that disagree with the store's curriculum are refused (``check_agrees_with_curriculum``),
when the store is opened and again before each round (a trainer may record a new one meanwhile).
A rebuild that fails is recorded in the store for the trainer waiting on it, unless another process
(a second serve, a rebuild) published the round meanwhile: then there is nothing to record.
A ready file, if asked for, exists exactly while the service watches an open store (a container
healthcheck tests for it).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from storage import Store, StoreError, UserError

from .errors import InvalidParameterError, RebuildCancelled
from .progress import StderrProgress
from .rebuild import check_agrees_with_curriculum, published_result, rebuild, store_curriculum
from .shard import ProcessGroupShard

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
    world_size: int = 1,
    max_restarts: int = 0,
    master_port: int = 0,
    **rebuild_options,
) -> ServeOutcome:
    """Rebuild rounds of the store at ``store_url`` until round ``until_round`` is published.

    until_round: last round to serve (default: the curriculum's R). once: do what can be done now,
    then return. wait_for_store: wait for the store to be created (default: unless ``once``).
    rebuild_options go to :func:`nbr_index.rebuild` (k, tau, mode, backend, ...).
    world_size, max_restarts, master_port: rebuild each round with that many local workers under
    the elastic agent (``nbr_index.shard.rebuild_sharded``). Under an outer torchrun every process
    runs this loop as one worker: rank 0 decides what to do next and tells the others.
    stall_seconds: test hook, sleep this long at the start of each rebuild (to kill it mid-round).
    ready_file: a path created once the store is open and watched, and removed on return.
    """
    if not (math.isfinite(poll_seconds) and poll_seconds > 0):   # nan would poll at 100% CPU
        raise InvalidParameterError(f"poll seconds must be a finite number above 0, got {poll_seconds}")
    from .launch import launched_by_torchrun, leave_process_group

    if launched_by_torchrun():
        build, shard = _torchrun_worker_rebuilds(rebuild_options, stall_seconds, progress_seconds)
    else:
        build = _local_rebuilds(world_size, max_restarts, master_port, rebuild_options, stall_seconds,
                                progress_seconds)
        shard = ProcessGroupShard(0, 1)
    stop = threading.Event()
    published: list[int] = []
    try:
        with _stop_on_signals(stop), _ready_file(ready_file if shard.is_main else None) as mark_ready:
            wait = not once if wait_for_store is None else wait_for_store
            store = _wait_for_store(store_url, poll_seconds, wait, stop)
            if store is None:
                return ServeOutcome(published, stopped=True)
            check_agrees_with_curriculum(store, rebuild_options)
            last = _last_round(store, until_round, rebuild_options.get("rounds"))
            if shard.is_main:
                log.info("serving %s: rounds 1..%d, polling every %.1f s%s", store.url, last, poll_seconds,
                         f", {world_size} workers per round" if world_size > 1 else "")
            mark_ready()
            while True:
                decision = _broadcast(shard, _next_step(store, last, stop, once) if shard.is_main else None)
                if decision == DONE:
                    log.info("round %d is published: all rounds up to %d done, exiting", last, last)
                    return ServeOutcome(published, stopped=False)
                if decision in (STOPPED, NOTHING_NOW):
                    if decision == STOPPED:
                        log.info("stopped by signal; published this run: %s", published or "none")
                    return ServeOutcome(published, stopped=decision == STOPPED)
                if decision == WAIT:
                    stop.wait(poll_seconds)
                    continue
                log.info("features round %d is complete: rebuilding neighbourhood round %d", decision - 1, decision)
                store = Store.open(store.url)  # the curriculum as the trainer records it now
                check_agrees_with_curriculum(store, rebuild_options)
                result = _build_recording_failure(build, store, decision, stop, shard)
                if result is None:
                    log.info("signal received: round %d abandoned before publishing (a restart redoes it)", decision)
                    return ServeOutcome(published, stopped=True)
                if result.published:
                    published.append(decision)
                if shard.is_main:
                    log.info("%s", result.summary())
    finally:
        leave_process_group()


def _build_recording_failure(build, store: Store, round: int, stop: threading.Event, shard: ProcessGroupShard):
    """build(store, round, stop), with its error recorded in the store before it propagates: a
    trainer waiting for ``round`` (``--index service``) then stops with that error at once instead
    of waiting out its timeout for a round that will not come. A build that failed while another
    process published the round (a second serve won the race) records nothing: the round is there."""
    if shard.is_main:
        store.clear_index_failure(round)
    try:
        return build(store, round, stop)
    except Exception as err:
        if round in store.published_rounds():
            log.info("round %d was published by another process while this one failed (%s): using it",
                     round, _one_line(f"{type(err).__name__}: {err}"))
            return published_result(store, round, published=False)
        if shard.is_main:
            _record_failure(store, round, err)
        raise


def _record_failure(store: Store, round: int, err: Exception) -> None:
    """Record ``err`` for the trainer waiting on ``round``. Where the store cannot take the record
    either (read-only, full), the error raised names what failed first, then that it went unrecorded."""
    try:
        store.record_index_failure(round, f"{type(err).__name__}: {err}")
    except UserError as unrecorded:
        if not isinstance(err, UserError):
            log.info("could not record the failure of round %d: %s", round, unrecorded)
            return  # the original error propagates, as it is
        raise type(err)(f"{_one_line(err)} (nor could this failure be recorded for a trainer waiting on the round: "
                        f"{_one_line(unrecorded)})") from err


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# What to do next, besides a round number to rebuild.
DONE, WAIT, NOTHING_NOW, STOPPED = "done", "wait", "nothing-now", "stopped"


def _next_step(store: Store, last: int, stop: threading.Event, once: bool):
    """The lowest round 1..last whose features are complete and that is not published yet; or
    DONE (all published), STOPPED (a signal), NOTHING_NOW (--once and nothing ready), WAIT."""
    if stop.is_set():
        return STOPPED
    done = set(store.published_rounds())
    if all(r in done for r in range(1, last + 1)):
        return DONE
    ready = set(store.complete_feature_rounds())
    for round in range(1, last + 1):
        if round not in done and (round - 1) in ready:
            return round
    return NOTHING_NOW if once else WAIT


def _broadcast(shard: ProcessGroupShard, decision):
    """Rank 0's decision, on every worker (under an outer torchrun)."""
    if shard.count == 1:
        return decision
    import torch.distributed as dist

    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _stalling_progress(round: int, stop: threading.Event, progress_seconds: float, stall_seconds: float):
    """progress(done, total) for one rebuild: prints, sleeps once if asked (test hook), and
    raises RebuildCancelled once ``stop`` is set (nothing is published then)."""
    report = StderrProgress(f"round {round}", every_seconds=progress_seconds)
    still_to_stall = stall_seconds > 0

    def progress(done: int, total: int) -> None:
        nonlocal still_to_stall
        if still_to_stall:
            still_to_stall = False
            stop.wait(stall_seconds)
        if stop.is_set():
            raise RebuildCancelled(f"round {round} abandoned")
        report(done, total)

    return progress


def _local_rebuilds(world_size: int, max_restarts: int, master_port: int, rebuild_options: dict,
                    stall_seconds: float, progress_seconds: float):
    """build(store, round, stop) -> RebuildResult, or None when a signal abandoned it: in this
    process, or with W workers under the elastic agent."""

    def in_process(store: Store, round: int, stop: threading.Event):
        try:
            return rebuild(store, round, progress=_stalling_progress(round, stop, progress_seconds, stall_seconds),
                           **rebuild_options)
        except RebuildCancelled:
            return None

    def with_workers(store: Store, round: int, stop: threading.Event):
        from torch.distributed.elastic.multiprocessing.api import SignalException

        from .shard import rebuild_sharded

        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return rebuild_sharded(store.url, round, world_size, max_restarts=max_restarts, master_port=master_port,
                                   stall_seconds=stall_seconds, progress_seconds=progress_seconds, **rebuild_options)
        except SignalException:  # the agent stopped the workers on our SIGTERM/SIGINT
            stop.set()
            return None
        finally:  # the agent installs its own handlers while it runs
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)

    return in_process if world_size == 1 and max_restarts == 0 else with_workers


def _torchrun_worker_rebuilds(rebuild_options: dict, stall_seconds: float, progress_seconds: float):
    """(build, shard) for one worker of an outer torchrun: every worker rebuilds its share."""
    from .shard import join_launcher_group

    shard, device = join_launcher_group(rebuild_options.get("device", "cpu"))
    options = {**rebuild_options, "device": device}

    def build(store: Store, round: int, stop: threading.Event):
        progress = _stalling_progress(round, stop, progress_seconds, stall_seconds)
        try:
            return rebuild(store, round, shard=shard, progress=progress, **options)
        except RebuildCancelled:
            return None

    return build, shard


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

"""One writer: a store has at most one training run writing it, a run dir at most one live process.

A run holds two locks from before its first write until it ends:

* the store's writer lease (``storage.lease``: an owner id, a heartbeat, taken over only when
  stale): a second training run on the same store is refused with one line naming the first;
* an flock on ``<run_dir>/.run.lock``: a second process in the same run dir (which would
  overwrite its checkpoint) is refused with one line naming the first. The kernel drops the
  flock when its process dies, SIGKILL included, so a crash never leaves a run dir locked.

Who holds them: ``trainer run --world-size W`` (the launcher) holds both for its W workers
and all their elastic restarts, and passes the run's id to the workers; otherwise rank 0 of
``train`` takes them (one process, an outer torchrun, the Python API) and broadcasts the id, so
the workers of one run never refuse each other. Every rank writes its feature staging under the
run's id (``Store.write_as``), and rank 0's store handle checks the lease before each write.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from storage.errors import UserError
from trainer.config import TrainConfig
from trainer.errors import TrainerError
from trainer.world import World

RUN_LOCK = ".run.lock"


def new_run_id() -> str:
    """A run's id: under torchrun its job's (the same for every rank and every elastic restart
    of that job), else a fresh one: ``20250101T120000-1a2b3c4d``."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job and "RANK" in os.environ:
        return "torchrun-" + re.sub(r"[^A-Za-z0-9_.-]", "_", job)[:48]
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


class RunDirLock:
    """An exclusive flock on ``<run_dir>/.run.lock`` (creating the run dir), held until
    :meth:`release` or the process's death. The file names its holder for the refusal message."""

    def __init__(self, run_dir: str, run_id: str) -> None:
        path = os.path.join(run_dir, RUN_LOCK)
        try:
            os.makedirs(run_dir, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise TrainerError(f"cannot lock run dir {run_dir}: {err.strerror or err}: use a writable --run-dir") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_of(self._fd)
            os.close(self._fd)
            raise TrainerError(f"run dir {run_dir} is in use by another live process ({holder}): wait for it to "
                               f"end (or stop it), then continue with --resume, or use another --run-dir") from None
        # Best effort, for the message above: the lock is the flock, not these bytes.
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)   # drops the flock; the file stays (removing it would race a taker)
            self._fd = -1


def _holder_of(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"host {holder['host']}, pid {holder['pid']}, run {holder['run_id']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "it has not said who it is yet"


@dataclass
class RunLocks:
    """What a process of a run knows about its locks: the run's id (every rank), and what its store
    writes check (the lease held here, the launcher's watched on its rank 0, else None)."""
    run_id: str
    lease: object = None
    _held: list = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Release what this process holds, the run dir's lock first. Idempotent."""
        while self._held:
            self._held.pop().release()


def take_run_locks(cfg: TrainConfig, run_id: str | None = None) -> RunLocks:
    """The store's writer lease, then the run dir's lock, for the run ``run_id`` (default: a new
    id). One-line error (storage.LeaseHeld / TrainerError) naming the holder if either is held by
    a live process; then nothing is held. Call before anything of the run is written."""
    from storage import take_writer_lease

    run_id = run_id or new_run_id()
    lease = take_writer_lease(cfg.store, cfg.run_dir, run_id)
    try:
        lock = RunDirLock(cfg.run_dir, run_id)
    except BaseException:
        lease.release()
        raise
    return RunLocks(run_id, lease, [lease, lock])


@contextlib.contextmanager
def holding_run_locks(cfg: TrainConfig) -> Iterator[RunLocks]:
    """The launcher's: both locks for the whole run (all workers, all restarts), released at its
    end, on a one-line error too."""
    locks = take_run_locks(cfg)
    try:
        yield locks
    finally:
        locks.release()


@contextlib.contextmanager
def run_locks(cfg: TrainConfig, world: World, held_by: str | None) -> Iterator[RunLocks]:
    """Inside ``train``, on every rank: the run's locks as this rank sees them.

    ``held_by``: the run id of a launcher that holds both locks (its workers take nothing; rank 0
    watches the lease). None: rank 0 takes them and every rank gets the run's id, or the same
    one-line error. Released when the block ends.
    """
    from storage import watch_writer_lease

    if held_by is not None:
        yield RunLocks(held_by, watch_writer_lease(cfg.store, held_by) if world.is_main else None)
        return
    taken, failure = None, None
    if world.is_main:
        try:
            taken = take_run_locks(cfg)
        except UserError as err:
            failure = err
    run_id, failure = world.broadcast_object((taken.run_id if taken else None, failure))
    if failure is not None:
        raise failure
    try:
        yield taken or RunLocks(run_id)
    finally:
        if taken is not None:
            taken.release()

"""One training run writes a store at a time: the writer lease.

The lease is one small JSON object at the store's root, ``writer-lease.json``::

    {"format": "and-nbr-writer-lease", "version": 1, "owner": <run id>, "run_dir": <abs path>,
     "host": <host name>, "pid": <pid>, "started": <unix s>, "heartbeat": <unix s>}

The owner (a training run: its launcher or its rank 0) takes it before writing anything, a daemon
thread rewrites ``heartbeat`` every :data:`HEARTBEAT_S` seconds, and a clean or one-line-error
exit removes it. Another process may take it over only when it is *stale*: no heartbeat for
:data:`STALE_AFTER_S` seconds, or its holder is a process of this same host that no longer exists
(then nobody waits out the staleness after a crash on the same machine), or it is the same run
(same owner id: the workers of an elastic restart, whose earlier attempt the agent stopped).

How a take is made safe:

* local directory: every read-and-write of the lease (take, heartbeat, release) holds an flock
  on ``.writer-lease.lock`` beside it, so takers are serialised and the heartbeat never
  overwrites a lease someone has taken over; the file is replaced by a rename, so a reader
  never sees half of one. The flock dies with its process: a crash never leaves it locked.
* object stores (fsspec URLs) have no lock and no conditional put through fsspec: a taker
  writes its lease, waits :data:`SETTLE_S`, and reads it back; if another owner's is there, the
  other won. Residual race: two takers whose check-then-put gaps overlap by more than the
  settle time may both read back their own. The next heartbeat (at most HEARTBEAT_S later)
  of the one whose put landed first finds the other owner and marks its lease lost, and
  :meth:`WriterLease.check`, which a leased store handle runs before each write, refuses its
  writes from then on.

Staleness is measured with the reader's clock against the owner's: hosts sharing a store must
keep their clocks within a small part of STALE_AFTER_S of each other (NTP does).

``nbr-index serve`` and ``rebuild`` do not take the lease: they publish neighbourhood rounds
only, each a single-writer atomic publish of its own (storage.publish).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace

from storage.errors import StoreError
from storage.layout import WRITER_LEASE, WRITER_LEASE_LOCK
from storage.location import Location, open_location
from storage.publish import remove_stale_tmps, store_io

#: Seconds between heartbeats: one tiny write (a rename on local disk, a put on an object store),
#: cheap at this rate, and a crashed owner elsewhere blocks the store for at most 5 of them.
HEARTBEAT_S = 20.0
#: No heartbeat for this long: the owner is taken for dead. Five missed beats, so that a slow or
#: stalled disk or object store, a swapping or paused process and clock differences between hosts
#: of tens of seconds never make a live owner look dead; a crash on the same host needs no wait
#: (its pid is gone), a crash elsewhere costs at most this long before the store can be taken.
STALE_AFTER_S = 5 * HEARTBEAT_S
#: Object stores: how long a taker waits after its put before reading the lease back.
SETTLE_S = 0.5

_FORMAT = "and-nbr-writer-lease"
_VERSION = 1


class LeaseHeld(StoreError):
    """Another live training run writes the store."""


class LeaseLost(StoreError):
    """This run's lease was taken over (it looked dead) or removed: it must not write any more."""


@dataclass(frozen=True)
class LeaseRecord:
    """What ``writer-lease.json`` says: who writes the store, and when it last said so."""

    owner: str          # the run's id (all its ranks and restarts share it)
    run_dir: str        # absolute
    host: str
    pid: int
    started: float      # unix seconds, the owner's clock
    heartbeat: float    # unix seconds, the owner's clock

    def to_json(self) -> bytes:
        return json.dumps({"format": _FORMAT, "version": _VERSION, **asdict(self)}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "LeaseRecord | None":
        """The record in ``data``; None if it is not a lease this code can read."""
        try:
            raw = json.loads(data)
            if raw.get("format") != _FORMAT or raw.get("version") != _VERSION:
                return None
            record = cls(owner=str(raw["owner"]), run_dir=str(raw["run_dir"]), host=str(raw["host"]),
                         pid=int(raw["pid"]), started=float(raw["started"]), heartbeat=float(raw["heartbeat"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        return record

    def age(self) -> float:
        """Seconds since the last heartbeat (by this host's clock; negative if the owner's runs ahead)."""
        return time.time() - self.heartbeat

    def holder_is_gone(self) -> bool:
        """True if the holder was a process of this host that no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:   # exists, another user's
            return False
        return False

    def describe(self) -> str:
        return (f"run dir {self.run_dir} (host {self.host}, pid {self.pid}, last heartbeat "
                f"{max(self.age(), 0.0):.0f}s ago)")


def read_writer_lease(url: str) -> LeaseRecord | None:
    """The lease of the store at ``url``; None if no run holds it (or it cannot be read)."""
    data = open_location(url).read_bytes(WRITER_LEASE)
    return None if data is None else LeaseRecord.from_json(data)


def take_writer_lease(url: str, run_dir: str, owner: str, *, heartbeat_s: float = HEARTBEAT_S,
                      stale_after_s: float = STALE_AFTER_S) -> "WriterLease":
    """Make this process the store's one writer, for the run ``owner`` (its id) in ``run_dir``.

    Takes a lease that is absent, stale, left by a dead process of this host or held by the same
    owner; raises :class:`LeaseHeld` (one line naming the holder and what to do) otherwise,
    changing nothing. Creates the store's directory if needed. The returned lease heartbeats from
    a daemon thread until :meth:`WriterLease.release`.
    """
    location = open_location(url)
    now = time.time()
    mine = LeaseRecord(owner=owner, run_dir=os.path.abspath(run_dir), host=socket.gethostname(),
                       pid=os.getpid(), started=now, heartbeat=now)
    with store_io(location, "take the writer lease"):
        _refuse_a_live_holder(location, mine, stale_after_s)   # a refusal only reads: nothing written
        with location.exclusive(WRITER_LEASE_LOCK):   # checked again: another taker may have been first
            _refuse_a_live_holder(location, mine, stale_after_s)
            # Temp files of lease writes killed before their rename: every lease write holds this
            # lock, so none is in flight now.
            remove_stale_tmps(location, WRITER_LEASE)
            location.write_bytes(WRITER_LEASE, mine.to_json())
        if not location.is_local:
            time.sleep(SETTLE_S)   # a concurrent taker's put lands, then we see who won
            _refuse_a_live_holder(location, mine, stale_after_s)
    return WriterLease(location, mine, heartbeat_s, stale_after_s)


def _refuse_a_live_holder(location: Location, mine: LeaseRecord, stale_after_s: float) -> None:
    data = location.read_bytes(WRITER_LEASE)
    if data is None:
        return
    held = LeaseRecord.from_json(data)
    if held is None:
        raise LeaseHeld(f"{location.url}/{WRITER_LEASE} cannot be read: if no training run uses store "
                        f"{location.url}, remove that file and start again")
    if held.owner == mine.owner or held.holder_is_gone() or held.age() > stale_after_s:
        return
    same_run_dir = held.run_dir == mine.run_dir
    raise LeaseHeld(
        f"store {location.url} is being written by another training run: {held.describe()}; "
        + ("wait for it to end (or stop it), then continue with --resume" if same_run_dir else
           "wait for it to end, stop it, or use another --store")
        + f" (a lease without a heartbeat for {stale_after_s:.0f}s is taken over)")


def watch_writer_lease(url: str, owner: str, *, stale_after_s: float = STALE_AFTER_S) -> "LeaseWatch":
    """The lease of ``owner`` as seen by a process whose launcher holds it (a worker rank)."""
    return LeaseWatch(open_location(url), owner, stale_after_s)


class LeaseWatch:
    """A worker's view of the lease its launcher holds: ``check()`` before a write raises
    LeaseLost once the lease is another's or its holder stopped heartbeating (the launcher died:
    its workers must not write on unsupervised). One small read per check; no thread."""

    def __init__(self, location: Location, owner: str, stale_after_s: float) -> None:
        self._location, self.owner, self.stale_after_s = location, owner, stale_after_s

    def check(self) -> None:
        with store_io(self._location, "read the writer lease"):
            data = self._location.read_bytes(WRITER_LEASE)
        held = None if data is None else LeaseRecord.from_json(data)
        if held is None or held.owner != self.owner:
            raise LeaseLost(_lost_message(self._location, held, self.stale_after_s))
        if held.age() > self.stale_after_s:
            raise LeaseLost(f"the process holding this run's writer lease of store {self._location.url} "
                            f"({held.describe()}) stopped its heartbeat: stopped before writing; "
                            f"continue with --resume")


def _lost_message(location: Location, held: LeaseRecord | None, stale_after_s: float) -> str:
    taker = held.describe() if held else "nobody (the lease was removed)"
    return (f"this run lost the writer lease of store {location.url} to {taker} (it had no heartbeat "
            f"for {stale_after_s:.0f}s): stopped before writing; continue with --resume once that run has ended")


class WriterLease:
    """The writer lease this process holds. ``check()`` before a write; ``release()`` at the end
    (also a context manager). Costs one small write per heartbeat."""

    def __init__(self, location: Location, record: LeaseRecord, heartbeat_s: float, stale_after_s: float) -> None:
        self._location = location
        self.record = record
        self.stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name="writer-lease-heartbeat")
        self._thread.start()

    @property
    def owner(self) -> str:
        return self.record.owner

    def _beat(self, heartbeat_s: float) -> None:
        while not self._stop.wait(heartbeat_s):
            try:
                self.refresh()
            except LeaseLost:
                return   # check() says so at the next write
            except (OSError, StoreError):
                pass     # a full disk or a hiccup of the object store: try again next beat

    def refresh(self) -> None:
        """Write a new heartbeat; LeaseLost if the lease is no longer this process's."""
        location = self._location
        with store_io(location, "refresh the writer lease"):
            with location.exclusive(WRITER_LEASE_LOCK):
                self._raise_if_not_mine()
                self.record = replace(self.record, heartbeat=time.time())
                location.write_bytes(WRITER_LEASE, self.record.to_json())

    def check(self) -> None:
        """LeaseLost (one line) unless this process still holds the lease; a heartbeat older than
        the staleness limit (the process was paused) is renewed first, if it is still ours."""
        with store_io(self._location, "read the writer lease"):
            self._raise_if_not_mine()
        if time.time() - self.record.heartbeat > self.stale_after_s / 2:
            self.refresh()

    def _raise_if_not_mine(self) -> None:
        if self._stop.is_set():
            raise LeaseLost(f"the writer lease of store {self._location.url} was released: this run writes no more")
        data = self._location.read_bytes(WRITER_LEASE)
        held = None if data is None else LeaseRecord.from_json(data)
        if held is None or held.owner != self.owner:
            raise LeaseLost(_lost_message(self._location, held, self.stale_after_s))

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this process's. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        location = self._location
        try:
            with location.exclusive(WRITER_LEASE_LOCK):
                held = LeaseRecord.from_json(location.read_bytes(WRITER_LEASE) or b"")
                if held is not None and held.owner == self.owner:
                    location.remove(WRITER_LEASE)
        except (OSError, StoreError):
            pass   # cannot write the store now: the lease goes stale and is taken over

    def __enter__(self) -> "WriterLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"WriterLease({self._location.url!r}, owner={self.owner!r})"

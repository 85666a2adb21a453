"""Where the store's bytes live: a local directory or an fsspec URL.

Zarr reads and writes the arrays; this module does the few things zarr has no API for and the
publishing protocol and the writer lease need: list a directory, remove a node, make a node
durable (fsync), (local only) rename a node into place atomically and durably, read and replace
one small object whole, hold a lock (local only), and try whether the store can be written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import ContextManager, Iterator

from storage.errors import StoreError
from storage.layout import TMP_PREFIX, tmp_path

#: How long ``exclusive`` waits for a lock: its holders keep it for one small read and write, so
#: only a holder stopped mid-way (SIGSTOP, a hung disk) makes anyone wait this long.
LOCK_WAIT_S = 30.0


def one_line(text: object) -> str:
    """Collapse a (possibly multi-line) message from a library into one line."""
    return " ".join(str(text).split())


def open_location(url: str) -> "Location":
    """A local path or ``file://`` URL -> LocalLocation; other ``scheme://`` -> FsspecLocation."""
    if not isinstance(url, (str, os.PathLike)) or not str(url):
        raise StoreError(f"store URL must be a non-empty path or URL, got {url!r}")
    url = str(url)
    if url.startswith("file://"):
        return LocalLocation(url, url[len("file://"):])
    if "://" not in url:
        return LocalLocation(url, url)
    return FsspecLocation(url)


class Location:
    """Base: ``url`` as the user gave it, ``zarr_store`` for zarr, and node-level operations.

    Paths given to the methods are relative to the store root, '/'-separated
    (``features/round-0002``).
    """

    url: str
    is_local: bool
    zarr_store: object

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def list_dir(self, path: str) -> list[str]:
        """Sorted child names of ``path``; [] if it does not exist."""
        raise NotImplementedError

    def remove(self, path: str) -> None:
        """Remove the node at ``path`` and everything under it; no error if absent."""
        raise NotImplementedError

    def rename(self, src: str, dst: str) -> bool:
        """Atomically move ``src`` to ``dst``; False (src untouched) if ``dst`` already exists.
        Once it returns True the move survives a power loss."""
        raise NotImplementedError

    def sync(self, *paths: str) -> None:
        """Make the files and directories at ``paths`` (each a node, or one file) durable: their
        bytes and their directory entries reach the disk before this returns."""
        raise NotImplementedError

    def read_bytes(self, path: str) -> bytes | None:
        """The whole file (object) at ``path``; None if there is none."""
        raise NotImplementedError

    def write_bytes(self, path: str, data: bytes) -> None:
        """Replace the file (object) at ``path`` with ``data`` at once, durably: a reader sees the
        old bytes or the new ones, never a part (local: a temp file renamed over it; object
        stores: one put). Creates the store's directory if needed."""
        raise NotImplementedError

    def exclusive(self, path: str) -> ContextManager[None]:
        """Hold the exclusive lock named ``path`` for a block (local: flock on that file, released
        by the kernel if the process dies). Object stores have no lock: a no-op, and callers
        read back what they wrote (see storage.lease)."""
        raise NotImplementedError

    def write_problem(self) -> str | None:
        """Why this process could not create or write the store's root, in one line, or None.

        Tried, not guessed from permission bits (root ignores those): a probe is created where
        the store's files would be, and removed; nothing is left behind.
        """
        raise NotImplementedError


class LocalLocation(Location):
    is_local = True

    def __init__(self, url: str, path: str) -> None:
        from zarr.storage import LocalStore

        self.url = url
        self.root = Path(os.path.abspath(os.path.expanduser(path)))
        self.zarr_store = LocalStore(self.root)

    def _abs(self, path: str) -> Path:
        return self.root / path if path else self.root

    def exists(self, path: str) -> bool:
        return self._abs(path).exists()

    def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._abs(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, path: str) -> None:
        target = self._abs(path)
        if target.is_dir():
            # A concurrent remover may delete entries first: only "already gone" is tolerated.
            shutil.rmtree(target, onerror=_ignore_missing)
        elif target.exists():
            target.unlink(missing_ok=True)

    def rename(self, src: str, dst: str) -> bool:
        # os.rename of a directory onto an existing non-empty directory fails with ENOTEMPTY or
        # EEXIST, which makes "first publisher wins" atomic without any lock.
        try:
            os.rename(self._abs(src), self._abs(dst))
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
        # The rename is a change of the parent directory: durable once the parent is synced.
        fsync_path(self._abs(dst).parent)
        return True

    def sync(self, *paths: str) -> None:
        for path in paths:
            target = self._abs(path)
            if target.is_dir():
                # Bottom-up: files, then the directories that name them.
                for folder, _, files in os.walk(target, topdown=False):
                    for name in files:
                        fsync_path(Path(folder) / name)
                    fsync_path(Path(folder))
            elif target.exists():
                fsync_path(target)

    def read_bytes(self, path: str) -> bytes | None:
        try:
            return self._abs(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_bytes(self, path: str, data: bytes) -> None:
        target = self._abs(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A unique temp name: a writer killed before its rename leaves a .tmp- file that readers
        # never take for the real one (and `describe` lists as a leftover).
        staged = self._abs(tmp_path(path, uuid.uuid4().hex))
        try:
            with open(staged, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(staged, target)
        finally:
            staged.unlink(missing_ok=True)
        fsync_path(target.parent)

    @contextmanager
    def exclusive(self, path: str) -> Iterator[None]:
        target = self._abs(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(f"{target} stayed locked for {LOCK_WAIT_S:.0f}s: a process holding "
                                         f"it is stopped or hung; find it with `fuser {target}`") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)   # drops the lock

    def write_problem(self) -> str | None:
        return local_write_problem(self.root)

    def __repr__(self) -> str:
        return f"LocalLocation({str(self.root)!r})"


def local_write_problem(path: Path | str) -> str | None:
    """Why this process could not create or write the directory ``path`` (one line), or None.

    Tried where the first write would happen, ``path`` itself or, if it does not exist yet, its
    nearest existing ancestor (where it would be created): a probe directory is made there and
    removed. Catches what permission bits do not show to root: a read-only file system, a path
    under a regular file.
    """
    existing = Path(os.path.abspath(os.path.expanduser(path)))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    probe = existing / f"{TMP_PREFIX}probe-{uuid.uuid4().hex}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as err:
        return f"{existing}: {err.strerror or one_line(err)}"
    return None


def fsync_path(path: Path | str) -> None:
    """fsync one file or directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ignore_missing(func, path, exc_info) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


class FsspecLocation(Location):
    is_local = False

    def __init__(self, url: str) -> None:
        try:
            from fsspec.core import url_to_fs
            from zarr.storage import FsspecStore

            self.fs, root = url_to_fs(url)
            self.zarr_store = FsspecStore.from_url(url)
        except (ImportError, ValueError, OSError) as err:
            raise StoreError(f"cannot open store URL {url}: {one_line(err)}") from err
        self.url = url
        self.root = root.rstrip("/")

    def _abs(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def exists(self, path: str) -> bool:
        # Object-store filesystems cache listings; a reader polling for new rounds needs fresh ones.
        self.fs.invalidate_cache()
        return bool(self.fs.exists(self._abs(path)))

    def list_dir(self, path: str) -> list[str]:
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self._abs(path), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        here = self._abs(path).strip("/")
        # Some filesystems list the directory itself among its children: skip it.
        children = {str(e).strip("/") for e in entries} - {here}
        return sorted(child.rpartition("/")[2] for child in children)

    def remove(self, path: str) -> None:
        if self.exists(path):
            try:
                self.fs.rm(self._abs(path), recursive=True)
            except FileNotFoundError:
                pass
        self.fs.invalidate_cache()

    def rename(self, src: str, dst: str) -> bool:
        raise StoreError(f"store {self.url} cannot rename atomically; publish in place instead")

    def sync(self, *paths: str) -> None:
        """Nothing to do: an object store's write is durable once it returns (fsspec's
        filesystems have no fsync; zarr's writes through them complete before returning)."""

    def read_bytes(self, path: str) -> bytes | None:
        self.fs.invalidate_cache()
        try:
            return bytes(self.fs.cat_file(self._abs(path)))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_bytes(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(self._abs(path), data)   # one put: whole or not at all
        self.fs.invalidate_cache()

    def exclusive(self, path: str) -> ContextManager[None]:
        return nullcontext()

    def write_problem(self) -> str | None:
        probe = f"{TMP_PREFIX}probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"")
            self.remove(probe)
        except (OSError, ValueError) as err:
            return one_line(err) or type(err).__name__
        return None

    def __repr__(self) -> str:
        return f"FsspecLocation({self.url!r})"

"""One writer per folder: a run folder, an export folder or a cache key folder.

A second process that would write into a folder a live process is writing gets a clear
error instead of interleaving files. The lock is `fcntl.flock` on `<folder>/.lock`: the
kernel releases it when the holder dies (a killed run leaves no stale lock to clean up),
and the file records the holder's pid and command for the error message.

Only one process of a multi-process job takes the lock (the main one); the others follow
its decision (see `FolderLock.acquire_for`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class FolderLocked(RuntimeError):
    """Another live process holds the folder's lock; the message says which."""


class FolderLock:
    """An exclusive, non-blocking lock on a folder, held until `release()` or exit."""

    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderLocked(
                f"{self.what} {self.folder} is in use by another live process ({holder}); wait for it to finish, "
                "stop it, or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "command": " ".join(sys.argv)[:500]}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    @classmethod
    def acquire_for(cls, folder, what: str, is_main: bool, broadcast=None) -> "FolderLock | None":
        """Main process takes the lock; with `broadcast` (a callable that sends a list of
        objects from the main process to all), every process raises the same FolderLocked."""
        lock, error = None, [None]
        if is_main:
            try:
                lock = cls(folder, what).acquire()
            except FolderLocked as exc:
                error = [str(exc)]
        if broadcast is not None:
            broadcast(error)
        if error[0]:
            raise FolderLocked(error[0])
        return lock


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info.get('pid')} on {info.get('host')}: {info.get('command', '?')}"
    except (OSError, ValueError):
        return "holder unknown"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a stale marker's owner died: it does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

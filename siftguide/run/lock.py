"""One process per run directory: ``<run dir>/run.lock``, an OS file lock (``filelock``), held while a run trains.

Two trainings in one directory would interleave their ``metrics.csv`` rows and overwrite each other's
``config.yaml``, checkpoints and ``results.json``. :class:`RunLock` takes the lock before anything is written and
gives it back when the run ends, however it ends: the operating system releases it when the process dies (a
``kill -9`` included), so a lock is never stale. Beside it, ``run.lock.holder`` names the holder (pid, host, since)
for the message a second process gets: it fails at once, naming the holder. On a disk shared between machines the
lock holds across them where the file system supports locks (NFS v4, Lustre); the holder's host is named. Under
DDP only global rank 0 takes it. The study's per-run lock (:mod:`siftguide.study`) is a :class:`RunLock` too.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UserError

__all__ = ["RunLock", "RunDirectoryInUse", "LOCK_FILE", "read_holder", "holder_text", "this_holder"]

log = logging.getLogger("siftguide.train")
LOCK_FILE = "run.lock"


class RunDirectoryInUse(UserError, RuntimeError):
    """Another live process holds this directory's lock."""


def this_holder(pid: int | None = None) -> dict:
    """What a holder file says of process ``pid`` (default: this one) on this host."""
    return {"pid": int(pid or os.getpid()), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def read_holder(path: Path) -> dict | None:
    """The holder named by a holder file ``{"pid", "host", ...}``, or None (missing or unreadable)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def holder_text(holder: dict) -> str:
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"pid {holder['pid']} on host {holder.get('host', '?')}{since}"


class RunLock:
    """Context manager holding ``<directory>/<name>`` for this process (``enabled=False``: a no-op, other DDP
    ranks). ``what`` names the holder's kind in the error (``training``, ``study``)."""

    def __init__(self, directory: str | Path, enabled: bool = True, name: str = LOCK_FILE,
                 what: str = "training") -> None:
        self.path = Path(directory) / name
        self.holder_path = self.path.with_name(name + ".holder")
        self.enabled, self.what = enabled, what
        self._lock: FileLock | None = None

    def acquire(self, holder_pid: int | None = None) -> None:
        """Take the lock or raise :class:`RunDirectoryInUse` at once, naming the holder."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path, blocking=False)
        try:
            lock.acquire()
        except Timeout:
            holder = read_holder(self.holder_path)
            named = holder_text(holder) if holder else "a process that has not yet named itself"
            raise RunDirectoryInUse(
                f"{self.path.parent} is in use by another {self.what} ({named}; {self.path}). Two of them in one "
                f"directory would mix their metrics and overwrite each other's checkpoints: give this one its own "
                f"directory (hydra.run.dir=... / --out ...), or wait for that one to end") from None
        self._lock = lock
        self.name_holder(holder_pid)

    def name_holder(self, pid: int | None = None) -> None:
        """Write who holds the lock (``pid``: e.g. the training process a study launched; default this one)."""
        if self._lock is not None:
            self.holder_path.write_text(json.dumps(this_holder(pid)) + "\n")

    @property
    def held(self) -> bool:
        return self._lock is not None

    def release(self) -> None:
        if self._lock is not None:
            self.holder_path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

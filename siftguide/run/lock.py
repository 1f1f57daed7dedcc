"""One training per run directory: ``<run dir>/run.lock`` names the process that trains there (pid and host).

Two trainings in one directory would interleave their ``metrics.csv`` rows and overwrite each other's
``config.yaml``, checkpoints and ``results.json``. :class:`RunLock` is taken (atomically, ``O_CREAT | O_EXCL``)
before anything is written and removed when the run ends, however it ends. A second training fails at once,
naming the holder. A lock whose process is gone (same host, pid not alive: the run was killed) is stale and taken
over with a warning. A lock from another host (a disk shared between machines) cannot be checked from here: it is
treated as held, and the error says how to clear it if that run is gone. Under DDP only global rank 0 takes it.

:func:`read_holder` and :func:`held_by_other` are shared with the study runner's per-run lock
(:mod:`siftguide.study`).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

__all__ = ["RunLock", "RunDirectoryInUse", "LOCK_FILE", "read_holder", "held_by_other", "holder_text", "this_holder"]

log = logging.getLogger("siftguide.train")
LOCK_FILE = "run.lock"


class RunDirectoryInUse(RuntimeError):
    """Another live process trains in this run directory."""


def this_holder(pid: int | None = None) -> dict:
    """The lock contents for process ``pid`` (default: this one) on this host."""
    return {"pid": int(pid or os.getpid()), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def read_holder(path: Path) -> dict | None:
    """The holder named by a lock file: ``{"pid", "host", ...}``; a bare pid (older study locks) counts as this
    host's; ``None`` when the file is missing or names no pid."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    if isinstance(holder, int):
        holder = {"pid": holder}
    if not isinstance(holder, dict):  # "pid" or "pid host"
        parts = text.split()
        if not parts or not parts[0].isdigit():
            return None
        holder = {"pid": int(parts[0]), **({"host": parts[1]} if len(parts) > 1 else {})}
    if not isinstance(holder.get("pid"), int):
        return None
    holder.setdefault("host", socket.gethostname())
    return holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def held_by_other(holder: dict | None) -> bool:
    """Whether a lock's holder may still be running: a live pid on this host, or any pid on another host (its
    liveness cannot be checked from here)."""
    if holder is None:
        return False
    if holder["host"] != socket.gethostname():
        return True
    return _alive(holder["pid"])


def holder_text(holder: dict) -> str:
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"pid {holder['pid']} on host {holder['host']}{since}"


class RunLock:
    """Context manager holding ``<run_dir>/run.lock`` for this process (``enabled=False``: a no-op, other DDP
    ranks)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.enabled = enabled
        self._mine: dict | None = None

    def acquire(self) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = this_holder()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = read_holder(self.path)
                if held_by_other(holder):
                    other_host = holder["host"] != me["host"]
                    raise RunDirectoryInUse(
                        f"run directory {self.path.parent} is in use by another training ({holder_text(holder)}; "
                        f"{self.path}). Two trainings in one directory would mix their metrics and overwrite each "
                        f"other's checkpoints: give this run its own hydra.run.dir, or wait for that one to end"
                        + (f". The holder runs on another host, so this one cannot check whether it is still alive: "
                           f"if it is gone, delete {self.path}" if other_host else ""))
                if holder is not None:
                    log.warning("%s: taking over a stale lock (%s is not running: that training was killed)",
                                self.path, holder_text(holder))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self._mine = me
            return
        raise RunDirectoryInUse(f"could not take {self.path}: other processes keep creating it")

    def release(self) -> None:
        if self._mine is not None and read_holder(self.path) == {**self._mine}:
            self.path.unlink(missing_ok=True)
        self._mine = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

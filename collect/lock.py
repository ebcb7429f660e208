"""The exclusive lock of a store folder: one collector (or repair) writes a store at a time.

`flock(LOCK_EX | LOCK_NB)` on `FOLDER/.lock`. The kernel drops the lock when its holder exits in any
way (kill -9 included), so a lock file left by a dead process never blocks anyone: the next collector
takes it over and says so. The file records its holder (pid, host, start time, command) only for the
messages. The file itself is never removed (removing it would let two processes lock two different
files of the same name). On a filesystem without flock (some network mounts) the collector warns and
runs unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from .store import StoreError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}: {holder.get('command')}"


class StoreLock:
    """Hold the store folder's lock from `acquire()` (or `with`) to `release()` or the process's end."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> StoreLock:
        previous = _holder(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in UNSUPPORTED:
                logger.warning("%s: this filesystem has no flock (%s); a second collector into this folder "
                               "would not be detected", self.path, e.strerror)
                return self
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreError(f"{self.path.parent} is being written by another collector "
                                 f"({_describe(_holder(self.path))}); wait for it to finish or stop it, or "
                                 "write to another --output_dir") from None
            raise
        if previous:  # its holder exited without releasing it (killed): the kernel freed the lock
            logger.info("%s: taking over the lock of %s, which is no longer running", self.path,
                        _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: released in order (a holder record = died holding it)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def active_writer(folder: str | Path) -> str | None:
    """Who holds the lock of `folder` right now (a description), or None: a reader's warning that the
    store may still grow. Takes and drops a shared lock; never blocks."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError as e:
        return _describe(_holder(path)) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
    finally:
        os.close(fd)

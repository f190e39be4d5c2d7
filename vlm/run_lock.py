"""One run per run directory: an exclusive lock on `run_dir/.lock` for the run's lifetime.

Two runs writing one directory would mix their logs, config and checkpoints. The lock is `flock` on a file that
also records its holder (PID, host, start time), so a second run fails at once and says who holds it. The kernel
drops a lock when its process dies, however it dies: a lock file still naming a holder, but free, was left by a
process that is gone, and is taken over with a warning (so `resume=auto` after a crash just works).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("vlm")

LOCK_NAME = ".lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunDirLock:
    """`with RunDirLock(run_dir):` holds the lock for the block (`enabled=False`: a no-op, for ranks other than 0)."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.enabled = enabled
        self._fd: int | None = None

    def acquire(self) -> None:
        if not self.enabled or self._fd is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunDirLocked(
                f"run_dir {self.run_dir} is in use by another run (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, since {holder.get('since', '?')}); wait for it to end, or choose "
                "another run_dir") from None
        previous = _read(fd)
        if previous:
            log.warning("run_dir %s: taking over the lock left by pid %s on host %s (that run is no longer running)",
                        self.run_dir, previous.get("pid", "?"), previous.get("host", "?"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()}\nhost {socket.gethostname()}\n"
                       f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Clear the holder and unlock (the file stays: removing it would let two runs lock two different files)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(fd: int) -> dict[str, str]:
    data = os.pread(fd, 4096, 0).decode("utf-8", "replace")
    return dict(line.split(" ", 1) for line in data.splitlines() if " " in line)

"""One server per data directory: an exclusive ``flock`` on ``<data>/machineserver.lock``,
held for the server's life.

Two servers on one directory would both mark the other's sessions OFF at start and both
accept the same session ids. The lock is advisory but every MachineServer takes it before
it opens anything else. The holder writes its pid, host and start time into the file, so
the second server's error says who holds it. The kernel drops the lock when the holder's
process ends however it ends (SIGKILL included), so a stale lock never blocks a restart;
the descriptor is not inherited by child processes (QEMU), which therefore never keep it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "machineserver.lock"


class DataDirLocked(Exception):
    """Another server holds the data directory."""

    def __init__(self, data_dir: Path, holder: dict[str, object] | None) -> None:
        if holder:
            started = holder.get("start_time")
            when = (time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(float(started)))
                    if isinstance(started, int | float) else "at an unknown time")
            who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"
        else:
            who = "a process that did not say who it is"
        super().__init__(
            f"data directory {data_dir} is in use by another MachineServer ({who}); "
            "stop that server or give this one another --data-dir")
        self.data_dir = data_dir
        self.holder = holder or {}


class DataDirLock:
    """``acquire()`` takes the lock or raises DataDirLocked; ``release()`` drops it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DataDirLocked(self.data_dir, holder) from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a starting server)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the flock


def _read_holder(fd: int) -> dict[str, object] | None:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        data = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

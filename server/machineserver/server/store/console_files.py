"""Session console logs on disk: one append-only file per session, ``console/{session}.log``.

A file is a 16-byte header (the magic ``MSCONS1\\n`` and, little-endian u64, the absolute
console offset of the first byte kept) followed by the bytes. Output is appended at the
end; once the file holds more than ``retain`` plus some slack (``slack_for``), the newest
``retain`` bytes are written with a new header into a temporary file that is renamed over
the old one, so a reader or a crash sees either the old file or the new one, never half
of either. A file therefore holds at most ``retain + slack_for(retain)`` bytes of output.

No fsync, on purpose: once ``write()`` returns, the bytes are in the operating system's
page cache, and that survives the server process being killed (SIGKILL included); only
an OS crash or a power loss can lose the newest writes, the same promise the SQLite
records make (WAL with synchronous=NORMAL). Everything here blocks: the core calls it off
the event loop.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from pathlib import Path

MAGIC = b"MSCONS1\n"
HEADER = struct.Struct("<8sQ")
SUFFIX = ".log"


def slack_for(retain: int) -> int:
    """How far past ``retain`` a file may grow before it is trimmed (half of it, at least
    64 KiB): a trim rewrites ``retain`` bytes, so it happens once per that much output."""
    return max(retain // 2, 64 * 1024)


class ConsoleFile:
    """One session's console file. Not thread-safe: one writer at a time (the core runs
    every call for a session from one task)."""

    def __init__(self, path: Path, retain: int) -> None:
        self.path = path
        self.retain = retain
        self._fd: int | None = None
        self._size = 0  # data bytes in the file

    def load(self) -> tuple[int, bytes]:
        """(absolute offset of the first byte, the newest ``retain`` bytes) as stored; (0,
        b"") when there is no file. A file whose header is not ours is set aside as
        ``*.damaged`` and the log starts empty."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0, b""
        if len(raw) < HEADER.size or raw[:len(MAGIC)] != MAGIC:
            os.replace(self.path, self.path.with_suffix(".damaged"))
            return 0, b""
        _, start = HEADER.unpack_from(raw)
        data = raw[HEADER.size:]
        if len(data) > self.retain:
            start += len(data) - self.retain
            data = data[-self.retain:]
        return start, data

    def append(self, data: bytes, start_if_new: int = 0) -> None:
        """Append bytes (``start_if_new``: the absolute offset of ``data[0]``, used when
        the file does not exist yet); trims the file when it has grown past its bound."""
        if self._fd is None:
            self._open(start_if_new)
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._size += len(data)
        if self._size > self.retain + slack_for(self.retain):
            self._trim()

    def _open(self, start_if_new: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self._write_new(start_if_new, b"")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        size = os.fstat(fd).st_size - HEADER.size
        if size < 0:
            os.close(fd)
            raise OSError(f"{self.path}: shorter than its header")
        self._fd, self._size = fd, size

    def _trim(self) -> None:
        """Keep the newest ``retain`` bytes: a new file renamed over this one."""
        assert self._fd is not None
        keep = self.retain
        with open(self.path, "rb") as f:
            _, start = HEADER.unpack(f.read(HEADER.size))
            f.seek(HEADER.size + self._size - keep)
            tail = f.read(keep)
        self.replace(start + self._size - keep, tail)

    def replace(self, start: int, data: bytes) -> None:
        """Make the file hold exactly ``data`` from absolute offset ``start`` (atomic)."""
        self.close()
        self._write_new(start, data)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = len(data)

    def _write_new(self, start: int, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(HEADER.pack(MAGIC, start))
                f.write(data)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class ConsoleStore:
    """The directory of console files. Temporary files a crash left mid-trim are removed
    when it opens (the file they were to replace is still whole)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stray in self.root.glob(".*.tmp"):
            stray.unlink(missing_ok=True)

    def file(self, session_id: str, retain: int) -> ConsoleFile:
        return ConsoleFile(self.root / f"{session_id}{SUFFIX}", retain)

    def session_ids(self) -> set[str]:
        """The sessions that have a console file."""
        return {p.name[:-len(SUFFIX)] for p in self.root.glob(f"*{SUFFIX}")}

    def remove(self, session_id: str) -> None:
        (self.root / f"{session_id}{SUFFIX}").unlink(missing_ok=True)

"""A session's console output: an append-only byte log with absolute offsets, keeping the
newest ``retain`` bytes, that readers follow from any offset.

With a ``ConsoleFile`` (store/console_files.py) the log is also kept on disk, so it
survives a server restart: the log starts from what the file holds (offsets go on from
where they were: absolute and monotonic across the restart), and new output is written
behind, off the event loop, by one task per log. While a write is under way, further
output gathers in memory and goes out as one write next, so a chatty console costs a
write per batch, not per byte, and the loop never waits for the disk. Nothing is fsynced
(see console_files.py): bytes whose write was issued survive a SIGKILL of the server; only
what was still waiting for the current write (normally well under a millisecond of
output) can be lost with the process. ``close`` (a graceful stop) writes everything.

Marks (:class:`ConsoleMark`) record what happened to the machine between two bytes: a
reset, a power-on, a snapshot restored. They never change the bytes. The log keeps the
newest ``MAX_MARKS`` of them, and none older than the retained bytes; they are kept in
memory only (a server restart forgets them, the bytes stay).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from machineserver.server.core.errors import MachineServerError
from machineserver.server.store.console_files import ConsoleFile

log = structlog.get_logger(__name__)


class OffsetOutOfRange(MachineServerError):
    pass


class MarkKind(enum.Enum):
    RESET = "reset"
    POWER_ON = "power-on"
    SNAPSHOT_RESTORED = "snapshot restored"


@dataclass(frozen=True)
class ConsoleMark:
    """An event between console bytes: it came after byte ``offset - 1`` and before byte
    ``offset``. ``time``: seconds since the epoch (server clock); ``seq``: its number in
    the log (0, 1, 2, ...: a follower's place among the marks)."""

    offset: int
    kind: MarkKind
    time: float
    detail: str
    seq: int


@dataclass(frozen=True)
class ConsoleChunk:
    offset: int
    data: bytes
    dropped: int = 0
    # marks whose offset lies in [offset, offset + len(data)], in offset order
    marks: tuple[ConsoleMark, ...] = ()


class ConsoleLog:
    MAX_CHUNK = 64 * 1024
    MAX_MARKS = 1024

    def __init__(self, retain: int = 1 << 20, file: ConsoleFile | None = None) -> None:
        """``file``: where the log is kept (loaded now, blocking: at server start and
        session creation only); None keeps it in memory only."""
        self._buf = bytearray()
        self._start = 0  # absolute offset of _buf[0]
        self._retain = retain
        self._grew = asyncio.Event()
        self._closed = False
        self._file = file
        if file is not None:
            self._start, data = file.load()
            self._buf += data
        self._unwritten = bytearray()  # output not yet handed to the file
        self._rewrite = False  # a write failed: the next one rewrites the whole log
        self._writer: asyncio.Task[None] | None = None
        self._marks: deque[ConsoleMark] = deque(maxlen=self.MAX_MARKS)
        self._next_seq = 0  # the seq the next mark gets

    @property
    def end(self) -> int:
        return self._start + len(self._buf)

    def append(self, data: bytes) -> None:
        if not data:
            return
        self._buf += data
        excess = len(self._buf) - self._retain
        if excess > 0:
            del self._buf[:excess]
            self._start += excess
            while self._marks and self._marks[0].offset < self._start:
                self._marks.popleft()
        self._grew.set()
        if self._file is not None and not self._closed:
            self._unwritten += data
            if self._writer is None or self._writer.done():
                self._writer = asyncio.get_running_loop().create_task(self._write_behind())

    def mark(self, kind: MarkKind, detail: str) -> ConsoleMark:
        """Record ``kind`` at the current end of the log (wakes followers at once)."""
        entry = ConsoleMark(self.end, kind, time.time(), detail, self._next_seq)
        self._next_seq += 1
        self._marks.append(entry)
        self._grew.set()
        return entry

    @property
    def marks(self) -> tuple[ConsoleMark, ...]:
        """The marks kept, oldest first."""
        return tuple(self._marks)

    def _marks_from(self, seq: int, upto: int) -> tuple[ConsoleMark, ...]:
        """Kept marks numbered ``seq`` or later whose offset is at most ``upto``."""
        return tuple(m for m in self._marks if m.seq >= seq and m.offset <= upto)

    async def _write_behind(self) -> None:
        """Hand what gathered to the file, one batch at a time, until nothing is left."""
        file = self._file
        assert file is not None
        while self._unwritten and self._file is file:
            batch, start = bytes(self._unwritten), self.end - len(self._unwritten)
            self._unwritten.clear()
            rewrite, self._rewrite = self._rewrite, False
            try:
                if rewrite:
                    await asyncio.to_thread(file.replace, self._start, bytes(self._buf))
                else:
                    await asyncio.to_thread(file.append, batch, start)
            except OSError as exc:
                log.warning("console_write_failed", path=str(file.path), error=str(exc))
                self._rewrite = True  # the file may now miss bytes: rewrite it whole next time

    async def flush(self) -> None:
        """Wait until every byte appended so far was handed to the file."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def read(self, offset: int, limit: int = MAX_CHUNK) -> ConsoleChunk:
        if offset > self.end:
            raise OffsetOutOfRange(f"offset {offset} is past the end of the console ({self.end})")
        dropped = max(0, self._start - offset)
        begin = max(offset, self._start) - self._start
        return ConsoleChunk(self._start + begin, bytes(self._buf[begin : begin + limit]), dropped)

    async def close(self) -> None:
        """End followers; write what is left to the file and close it (the log stays on
        disk for the next start)."""
        self._closed = True
        self._grew.set()
        await self.flush()
        if self._file is not None:
            await asyncio.to_thread(self._file.close)

    async def discard(self) -> None:
        """End followers and delete the file (the session is gone)."""
        self._closed = True
        self._grew.set()
        file, self._file = self._file, None
        self._unwritten.clear()
        await self.flush()
        if file is not None:
            await asyncio.to_thread(file.remove)

    async def follow(self, offset: int, follow: bool, *, marks: bool = False) -> AsyncIterator[ConsoleChunk]:
        """Chunks from offset on; with follow, waits for more until the log is closed.
        ``marks``: chunks carry the marks at offset or later, each once, with the bytes
        they fall in; a mark that comes with no new bytes arrives as a chunk of its own
        (empty data). Without, chunks never carry marks and never are empty."""
        self.read(offset, 0)  # range check up front
        # the first mark this follower has not had: the first one at offset or later
        seq = next((m.seq for m in self._marks if m.offset >= offset), self._next_seq)
        while True:
            chunk = self.read(offset)
            end = chunk.offset + len(chunk.data)
            found = self._marks_from(seq, end) if marks else ()
            if chunk.data or found:
                offset = end
                if found:
                    seq = found[-1].seq + 1
                    chunk = ConsoleChunk(chunk.offset, chunk.data, chunk.dropped, found)
                yield chunk
                continue
            if not follow or self._closed:
                return
            self._grew.clear()
            if self.end > offset or (marks and self._marks and self._marks[-1].seq >= seq):
                continue
            await self._grew.wait()

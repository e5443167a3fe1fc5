"""A session's console output: an append-only byte log with absolute offsets, keeping the
newest ``retain`` bytes, that readers follow from any offset."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from machineserver.server.core.errors import MachineServerError


class OffsetOutOfRange(MachineServerError):
    pass


@dataclass(frozen=True)
class ConsoleChunk:
    offset: int
    data: bytes
    dropped: int = 0


class ConsoleLog:
    MAX_CHUNK = 64 * 1024

    def __init__(self, retain: int = 1 << 20) -> None:
        self._buf = bytearray()
        self._start = 0  # absolute offset of _buf[0]
        self._retain = retain
        self._grew = asyncio.Event()
        self._closed = False

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
        self._grew.set()

    def read(self, offset: int, limit: int = MAX_CHUNK) -> ConsoleChunk:
        if offset > self.end:
            raise OffsetOutOfRange(f"offset {offset} is past the end of the console ({self.end})")
        dropped = max(0, self._start - offset)
        begin = max(offset, self._start) - self._start
        return ConsoleChunk(self._start + begin, bytes(self._buf[begin : begin + limit]), dropped)

    def close(self) -> None:
        self._closed = True
        self._grew.set()

    async def follow(self, offset: int, follow: bool) -> AsyncIterator[ConsoleChunk]:
        """Chunks from offset on; with follow, waits for more until the log is closed."""
        self.read(offset, 0)  # range check up front
        while True:
            chunk = self.read(offset)
            if chunk.data:
                offset = chunk.offset + len(chunk.data)
                yield chunk
                continue
            if not follow or self._closed:
                return
            self._grew.clear()
            if self.end > offset:
                continue
            await self._grew.wait()

"""The channel to the plugin's instruction gate (see :mod:`.gate`, plugin/msplugin.c): the
control page the plugin creates and maps (``gate.ctl``), its layout, and the FIFOs: one
the plugin writes one byte to at each hold or carried-out command (``gate.notify``), one
it reads releases from (``gate.release``) and one it reads barrier commands from
(``gate.command``). Both ends open the FIFOs read-write and non-blocking: neither side
ever blocks on, or sees EOF for want of, its peer."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import struct
from collections.abc import Callable

MAGIC = b"MSGATE\x00\x01"
VERSION = 1
FLAG_EXACT_STOP = 1
FLAG_ALWAYS = 2
FLAG_LOCKSTEP = 4
FLAG_STOP_RECORD = 8
FLAG_WATCH_COPY = 16
FLAG_TOTAL = 32
SIZE = 4096
NEVER = (1 << 64) - 1
# offsets in the control page (see plugin/msplugin.c)
_VERSION = 8
FLAGS = 12
EXECUTED, LIMIT, REQUEST, APPLIED, ARMED, HOLDING, HOLDS = 16, 24, 32, 40, 48, 52, 56
NTRAPS, PENDING, PASS, TRAPS = 64, 72, 80, 128
DEADLINE, VCLOCK, STOPS, REACHED, IDLE, NBREAKS = 88, 96, 104, 112, 120, 124
TAIL = 3840  # lock-step inputs and watchpoints
IRQS, COMMANDS, COMMAND_ERROR, NWATCH = TAIL, TAIL + 64, TAIL + 72, TAIL + 76
HIT_ADDRESS, HIT_PC, HIT_ACCESS, HIT, WATCH = TAIL + 80, TAIL + 88, TAIL + 96, TAIL + 100, TAIL + 104
STOP_ICOUNT, STOP_PC, TOTAL = TAIL + 232, TAIL + 240, TAIL + 248
IRQ_LINES = 16 * 32
MAX_WATCH = 8
WATCH_WRITE, WATCH_READ = 1, 2
MAX_TRAPS = (TAIL - TRAPS) // 8  # trap and breakpoint sites together
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")


class GateChannel:
    """The control page (mapped by :meth:`attach`, None before and after) and the FIFOs
    of one QEMU's gate; made (the FIFOs) before QEMU starts."""

    def __init__(self, directory: str) -> None:
        self.ctl_path = os.path.join(directory, "gate.ctl")
        self.notify_path = os.path.join(directory, "gate.notify")
        self.release_path = os.path.join(directory, "gate.release")
        self.command_path = os.path.join(directory, "gate.command")
        os.mkfifo(self.notify_path, 0o600)
        os.mkfifo(self.release_path, 0o600)
        os.mkfifo(self.command_path, 0o600)
        self.page: mmap.mmap | None = None
        self._last: dict[int, int] = {}
        self._notify_fd = self._release_fd = self._command_fd = -1

    def attach(self) -> bool:
        """Map the control page the plugin made (QEMU is up) and open the FIFOs. False,
        and nothing mapped, when the page is missing or not the plugin's."""
        try:
            fd = os.open(self.ctl_path, os.O_RDWR)
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size < SIZE:
                return False
            page = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        if page[:8] != MAGIC or U32.unpack_from(page, _VERSION)[0] != VERSION:
            page.close()
            return False
        self.page = page
        self._notify_fd = os.open(self.notify_path, os.O_RDWR | os.O_NONBLOCK)
        self._release_fd = os.open(self.release_path, os.O_RDWR | os.O_NONBLOCK)
        self._command_fd = os.open(self.command_path, os.O_RDWR | os.O_NONBLOCK)
        return True

    def close(self) -> None:
        if self.page is not None:
            self.page.close()
            self.page = None
        for fd in (self._notify_fd, self._release_fd, self._command_fd):
            if fd >= 0:
                os.close(fd)
        self._notify_fd = self._release_fd = self._command_fd = -1

    # ------------------------------------------------------------------ the page
    def u64(self, offset: int) -> int:
        """The 64-bit field at ``offset``; closed (QEMU gone): what it last said."""
        if self.page is None:
            return self._last.get(offset, 0)
        value = int(U64.unpack_from(self.page, offset)[0])
        self._last[offset] = value
        return value

    def u32(self, offset: int) -> int:
        """The 32-bit field at ``offset`` (the page mapped)."""
        assert self.page is not None
        return int(U32.unpack_from(self.page, offset)[0])

    def put_u64(self, offset: int, value: int) -> None:
        assert self.page is not None
        U64.pack_into(self.page, offset, value)

    def put_u32(self, offset: int, value: int) -> None:
        assert self.page is not None
        U32.pack_into(self.page, offset, value)

    def flag(self, bit: int) -> bool:
        """Whether the plugin set ``bit`` in its flags (False when not mapped)."""
        return self.page is not None and bool(U32.unpack_from(self.page, FLAGS)[0] & bit)

    # ------------------------------------------------------------------ the FIFOs
    def release(self) -> None:
        """Let a held vCPU run on."""
        if self._release_fd >= 0:
            os.write(self._release_fd, b"g")

    def send_commands(self, codes: bytes) -> None:
        os.write(self._command_fd, codes)

    async def wait_notified(self, done: Callable[[], bool], deadline: float | None = None) -> None:
        """Until ``done()``, woken by the plugin's bytes on the notify FIFO (no polling).
        TimeoutError past ``deadline`` (the running loop's time; None: never)."""
        loop = asyncio.get_running_loop()
        while not done():
            ready: asyncio.Future[None] = loop.create_future()

            def readable(fut: asyncio.Future[None] = ready) -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(self._notify_fd, readable)
            try:
                if not done():
                    if deadline is None:
                        await ready
                    else:
                        await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
            finally:
                loop.remove_reader(self._notify_fd)
            self.drain()

    def drain(self) -> None:
        """Drop the notify bytes so far."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._notify_fd, 4096):
                pass

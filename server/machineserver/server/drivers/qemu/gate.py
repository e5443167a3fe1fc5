"""The instruction gate, from the driver's side: count the instructions one QEMU executes
and hold its vCPU at a count (plugin/msplugin.c has the protocol and the reasons for it).

The plugin also holds the vCPU before semihosting trap sites (:meth:`set_traps`; see
:mod:`.semihosting`): a hold there is answered like a counted run's, with a ^C, and
:meth:`take_pending_trap` says which site it was.

A counted run is: :meth:`InstructionGate.arm` with a limit while the VM is stopped,
resume it (gdbstub ``c``), and when the plugin holds the vCPU (:meth:`wait_hold`),
interrupt the VM with a ^C; the plugin lets the vCPU go once the VM stops, so it stops
at that block boundary. :meth:`release` lets a held vCPU run on instead (for barriers,
e.g. co-simulation). :meth:`disarm` after every stop.

Files, all in the QEMU's private directory: the control page the plugin creates and
maps (``gate.ctl``), a FIFO the plugin writes one byte to at each hold (``gate.notify``)
and one it reads releases from (``gate.release``). Both ends open the FIFOs read-write
and non-blocking: neither side ever blocks on, or sees EOF for want of, its peer.
``gate.watched``: the plugin's copies of the lock-step watched ranges, made at every VM
stop (:meth:`InstructionGate.set_copied_ranges`, :meth:`InstructionGate.copies`).

At every VM stop (with ``-icount``) the plugin also records QEMU's instruction count
and the pc (:attr:`InstructionGate.stop_icount`, :attr:`InstructionGate.stop_pc`), so a
stop needs no QMP ``query-replay`` and no gdbstub register read.

Single vCPU: the count is the sum over all vCPUs, and a hold holds the one that
reached the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import struct
from collections.abc import Iterable

MAGIC = b"MSGATE\x00\x01"
VERSION = 1
FLAG_EXACT_STOP = 1
FLAG_ALWAYS = 2
FLAG_LOCKSTEP = 4
FLAG_STOP_RECORD = 8
FLAG_WATCH_COPY = 16
SIZE = 4096
NEVER = (1 << 64) - 1
# offsets in the control page (see plugin/msplugin.c)
_VERSION, _FLAGS = 8, 12
_EXECUTED, _LIMIT, _REQUEST, _APPLIED, _ARMED, _HOLDING, _HOLDS = 16, 24, 32, 40, 48, 52, 56
_NTRAPS, _PENDING, _PASS, _TRAPS = 64, 72, 80, 128
_DEADLINE, _VCLOCK, _STOPS, _REACHED, _IDLE, _NBREAKS = 88, 96, 104, 112, 120, 124
_TAIL = 3840  # lock-step inputs and watchpoints
_IRQS, _COMMANDS, _COMMAND_ERROR, _NWATCH = _TAIL, _TAIL + 64, _TAIL + 72, _TAIL + 76
_HIT_ADDRESS, _HIT_PC, _HIT_ACCESS, _HIT, _WATCH = (_TAIL + 80, _TAIL + 88, _TAIL + 96,
                                                    _TAIL + 100, _TAIL + 104)
_STOP_ICOUNT, _STOP_PC = _TAIL + 232, _TAIL + 240
IRQ_LINES = 16 * 32
MAX_WATCH = 8
WATCH_WRITE, WATCH_READ = 1, 2
MAX_TRAPS = (_TAIL - _TRAPS) // 8  # trap and breakpoint sites together
COMMAND_TIMEOUT = 2.0
COMMAND_SPINS = 20  # passes of the event loop before waiting on the notify FIFO
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
# the watched copies file (see msplugin.c, "Watched copies")
WATCH_MAGIC = b"MSWATCH\x01"
WATCH_HEADER = 4096
WATCH_DATA = 1 << 20
WATCH_RANGES = 16
_W_NRANGES, _W_CAPACITY, _W_COPIED, _W_FAILED, _W_RANGES = 8, 12, 16, 24, 64
_W_RANGE = struct.Struct("<QII")


class InstructionGate:
    """One QEMU's gate. Create it (the FIFOs) before QEMU starts, pass
    :meth:`plugin_options` to the plugin, :meth:`attach` once QEMU is up.

    ``always``: the plugin keeps its counting callbacks registered from the start, for
    QEMU's single-threaded TCG loop (``-icount``), which has no vCPU resume callback to
    arm them on demand."""

    def __init__(self, directory: str, *, always: bool) -> None:
        self.always = always
        self.ctl_path = os.path.join(directory, "gate.ctl")
        self.notify_path = os.path.join(directory, "gate.notify")
        self.release_path = os.path.join(directory, "gate.release")
        self.command_path = os.path.join(directory, "gate.command")
        self.watched_path = os.path.join(directory, "gate.watched")
        os.mkfifo(self.notify_path, 0o600)
        os.mkfifo(self.release_path, 0o600)
        os.mkfifo(self.command_path, 0o600)
        self._command_fd = -1
        self._traps: list[int] = []
        self._breaks: list[int] = []
        self._page: mmap.mmap | None = None
        self._watched: mmap.mmap | None = None
        self._copied_ranges: tuple[tuple[int, int], ...] = ()
        self._last: dict[int, int] = {}
        self._notify_fd = -1
        self._release_fd = -1

    def plugin_options(self) -> dict[str, str]:
        options = {"gate": self.ctl_path, "notify": self.notify_path, "release": self.release_path,
                   "command": self.command_path, "watched": self.watched_path}
        if self.always:
            options["always"] = "on"
        return options

    def attach(self) -> None:
        """Map the control page the plugin made (QEMU is up). A page that is not the
        plugin's leaves the gate unusable rather than failing the machine."""
        try:
            fd = os.open(self.ctl_path, os.O_RDWR)
        except OSError:
            return
        try:
            if os.fstat(fd).st_size < SIZE:
                return
            page = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        if page[:8] != MAGIC or _U32.unpack_from(page, _VERSION)[0] != VERSION:
            page.close()
            return
        self._page = page
        if self._flag(FLAG_WATCH_COPY):
            self._watched = self._map_watched()
        self._notify_fd = os.open(self.notify_path, os.O_RDWR | os.O_NONBLOCK)
        self._release_fd = os.open(self.release_path, os.O_RDWR | os.O_NONBLOCK)
        self._command_fd = os.open(self.command_path, os.O_RDWR | os.O_NONBLOCK)

    def _map_watched(self) -> mmap.mmap | None:
        try:
            fd = os.open(self.watched_path, os.O_RDWR)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size < WATCH_HEADER + WATCH_DATA:
                return None
            page = mmap.mmap(fd, WATCH_HEADER + WATCH_DATA)
        finally:
            os.close(fd)
        if page[:8] != WATCH_MAGIC:
            page.close()
            return None
        return page

    def close(self) -> None:
        if self._page is not None:
            self._page.close()
            self._page = None
        if self._watched is not None:
            self._watched.close()
            self._watched = None
        for fd in (self._notify_fd, self._release_fd, self._command_fd):
            if fd >= 0:
                os.close(fd)
        self._notify_fd = self._release_fd = self._command_fd = -1

    # ------------------------------------------------------------------ state
    def _u64(self, offset: int) -> int:
        if self._page is None:  # closed (QEMU gone): what it last said
            return self._last.get(offset, 0)
        value = int(_U64.unpack_from(self._page, offset)[0])
        self._last[offset] = value
        return value

    def _flag(self, bit: int) -> bool:
        return self._page is not None and bool(_U32.unpack_from(self._page, _FLAGS)[0] & bit)

    @property
    def usable(self) -> bool:
        """Attached, and the plugin can stop the VM exactly at a hold (see msplugin.c)."""
        return self._page is not None and bool(
            _U32.unpack_from(self._page, _FLAGS)[0] & FLAG_EXACT_STOP)

    @property
    def executed(self) -> int:
        """Instructions executed while counting (always, with ``always``)."""
        return self._u64(_EXECUTED)

    @property
    def holds(self) -> int:
        """How many times the plugin has held the vCPU."""
        return self._u64(_HOLDS)

    @property
    def holding(self) -> bool:
        assert self._page is not None
        return bool(_U32.unpack_from(self._page, _HOLDING)[0])

    # ------------------------------------------------------------------ control
    def arm(self, limit: int) -> None:
        """Count, and hold once ``executed`` passes ``limit`` (at the end of the block
        that passes it: at most one block, <= 512 instructions, beyond). The VM must be
        stopped; the next resume applies it."""
        assert self._page is not None
        self._drain()
        _U64.pack_into(self._page, _LIMIT, limit)
        if not self.always and not _U32.unpack_from(self._page, _ARMED)[0]:
            _U32.pack_into(self._page, _ARMED, 1)
            _U64.pack_into(self._page, _REQUEST, self._u64(_REQUEST) + 1)

    def disarm(self) -> None:
        """No more holds; the counting callbacks go at the next resume (not with
        ``always``). Harmless when not armed."""
        if self._page is None:
            return
        _U64.pack_into(self._page, _LIMIT, NEVER)
        if not self.always and _U32.unpack_from(self._page, _ARMED)[0]:
            _U32.pack_into(self._page, _ARMED, 0)
            _U64.pack_into(self._page, _REQUEST, self._u64(_REQUEST) + 1)

    def set_traps(self, sites: Iterable[int]) -> None:
        """The semihosting trap sites the plugin holds the vCPU before (see
        msplugin.c). At most :data:`MAX_TRAPS`. The VM must be stopped."""
        addresses = sorted(sites)
        if len(addresses) + len(self._breaks) > MAX_TRAPS:
            raise ValueError(f"{len(addresses)} trap sites; the gate holds {MAX_TRAPS}")
        self._traps = addresses
        self._write_sites()

    def _write_sites(self) -> None:
        assert self._page is not None
        _U32.pack_into(self._page, _NTRAPS, 0)
        _U32.pack_into(self._page, _NBREAKS, 0)
        for i, address in enumerate(self._traps + self._breaks):
            _U64.pack_into(self._page, _TRAPS + 8 * i, address)
        _U32.pack_into(self._page, _NTRAPS, len(self._traps))
        _U32.pack_into(self._page, _NBREAKS, len(self._breaks))

    def take_pending_trap(self) -> int | None:
        """The trap site of the last trap hold, if one came since the last call."""
        if self._page is None:
            return None
        site = self._u64(_PENDING)
        _U64.pack_into(self._page, _PENDING, NEVER)
        return None if site == NEVER else site

    def pass_trap(self, site: int | None) -> None:
        """Let the vCPU run the trap at ``site`` (None: none) without a hold: for the
        step that performs the call."""
        if self._page is not None:
            _U64.pack_into(self._page, _PASS, NEVER if site is None else site)

    # ------------------------------------------------------------------ lock-step
    @property
    def lockstep_usable(self) -> bool:
        """The plugin can stop the VM at a virtual-clock deadline (see msplugin.c)."""
        return self._page is not None and bool(
            _U32.unpack_from(self._page, _FLAGS)[0] & FLAG_LOCKSTEP)

    def set_deadline(self, ns: int | None) -> None:
        """Stop the VM when its virtual clock reaches ``ns`` (None: never); applied when
        the VM next starts running. The VM must be stopped."""
        if self._page is not None:
            _U64.pack_into(self._page, _DEADLINE, NEVER if ns is None else ns)

    @property
    def stops(self) -> int:
        """VM stops so far (:attr:`vclock` is written before this is bumped)."""
        return self._u64(_STOPS)

    @property
    def vclock(self) -> int:
        """QEMU's virtual clock (ns) at the last VM stop."""
        return self._u64(_VCLOCK)

    @property
    def deadlines_reached(self) -> int:
        return self._u64(_REACHED)

    @property
    def stop_records(self) -> bool:
        """The plugin records the instruction count and the pc at every VM stop."""
        return self._flag(FLAG_STOP_RECORD)

    @property
    def stop_icount(self) -> int:
        """QEMU's instruction count at the last VM stop (what ``query-replay`` says)."""
        return self._u64(_STOP_ICOUNT)

    @property
    def stop_pc(self) -> int:
        """The pc at the last VM stop."""
        return self._u64(_STOP_PC)

    def set_copied_ranges(self, ranges: Iterable[tuple[int, int]]) -> bool:
        """Have the plugin copy these (address, size) memory ranges at every VM stop
        (empty: none). False, and none copied, when the plugin cannot (no copies file) or
        they do not fit (:data:`WATCH_RANGES` ranges, :data:`WATCH_DATA` bytes). The VM
        must be stopped."""
        wanted = tuple(ranges)
        page = self._watched
        if page is None:
            return False
        if wanted == self._copied_ranges:
            return True
        fits = (len(wanted) <= WATCH_RANGES
                and sum(size for _, size in wanted) <= WATCH_DATA)
        _U32.pack_into(page, _W_NRANGES, 0)
        self._copied_ranges = ()
        if not fits:
            return False
        offset = 0
        for i, (address, size) in enumerate(wanted):
            _W_RANGE.pack_into(page, _W_RANGES + _W_RANGE.size * i, address, size, offset)
            offset += size
        _U32.pack_into(page, _W_NRANGES, len(wanted))
        self._copied_ranges = wanted
        return True

    def copies(self, stops: int) -> list[bytes] | None:
        """The copied ranges' contents made at the VM stop that brought :attr:`stops` to
        ``stops`` (in :meth:`set_copied_ranges` order), or None when there are none of
        that stop (none asked for, or the plugin could not read a range)."""
        page = self._watched
        if page is None or not self._copied_ranges:
            return None
        if (_U64.unpack_from(page, _W_COPIED)[0] != stops
                or _U32.unpack_from(page, _W_FAILED)[0]):
            return None
        out = []
        offset = WATCH_HEADER
        for _, size in self._copied_ranges:
            out.append(page[offset:offset + size])
            offset += size
        return out

    @property
    def idle_at_deadline(self) -> bool:
        """Whether the vCPU slept (WFI, nothing pending) at the last deadline."""
        return self._page is not None and bool(_U32.unpack_from(self._page, _IDLE)[0])

    # ------------------------------------------------------------------ barrier commands
    @property
    def break_sites(self) -> tuple[int, ...]:
        return tuple(self._breaks)

    def set_break_sites(self, sites: Iterable[int]) -> bool:
        """Breakpoints the plugin holds the vCPU before, like trap sites but whatever the
        instruction (lock-step: a gdbstub breakpoint's debug stop lets QEMU warp the
        virtual clock). The VM must be stopped; :meth:`command` ``f`` flushes the
        translations made before. False when the list did not change."""
        addresses = sorted(set(sites))
        if addresses == self._breaks:
            return False
        if len(addresses) + len(self._traps) > MAX_TRAPS:
            raise ValueError(f"{len(addresses)} breakpoints; the gate holds "
                             f"{MAX_TRAPS - len(self._traps)} besides the trap sites")
        self._breaks = addresses
        self._write_sites()
        return True

    def set_watches(self, watches: Iterable[tuple[int, int, int]]) -> None:
        """Lock-step watchpoints (address, size, WATCH_WRITE|WATCH_READ bits), checked by
        the plugin after each access; flush (``f``) after a change."""
        assert self._page is not None
        items = list(watches)[:MAX_WATCH]
        _U32.pack_into(self._page, _NWATCH, 0)
        for i, (address, size, access) in enumerate(items):
            struct.pack_into("<QII", self._page, _WATCH + 16 * i, address, size, access)
        _U32.pack_into(self._page, _NWATCH, len(items))

    def take_hit(self) -> tuple[int, int, int] | None:
        """The lock-step watchpoint hit since the last call: (watched address, pc of the
        accessing instruction, WATCH_WRITE or WATCH_READ), or None."""
        if self._page is None or not _U32.unpack_from(self._page, _HIT)[0]:
            return None
        hit = (self._u64(_HIT_ADDRESS), self._u64(_HIT_PC),
               int(_U32.unpack_from(self._page, _HIT_ACCESS)[0]))
        _U32.pack_into(self._page, _HIT, 0)
        return hit

    def set_irqs(self, lines: Iterable[int]) -> bool:
        """Mark external interrupt lines for :meth:`command` ``i``; False when none."""
        assert self._page is not None
        words = [0] * (IRQ_LINES // 32)
        for line in lines:
            words[line // 32] |= 1 << (line % 32)
        for i, bits in enumerate(words):
            _U32.pack_into(self._page, _IRQS + 4 * i, bits)
        return any(words)

    async def command(self, codes: bytes) -> None:
        """Have QEMU's main loop carry out barrier commands (the VM stopped): ``i`` set the
        marked interrupts pending, ``f`` flush the translations. Waits until it has (woken
        through the notify FIFO, no polling).
        RuntimeError when QEMU does not answer in time or has no NVIC."""
        assert self._page is not None
        target = self._u64(_COMMANDS) + len(codes)
        _U32.pack_into(self._page, _COMMAND_ERROR, 0)
        self._drain()
        os.write(self._command_fd, codes)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMMAND_TIMEOUT
        # QEMU's main loop usually answers within a few passes of ours; else wait for the
        # byte the plugin writes to the notify FIFO once it has carried them out
        for _ in range(COMMAND_SPINS):
            if self._u64(_COMMANDS) >= target:
                break
            await asyncio.sleep(0)
        while self._u64(_COMMANDS) < target:
            ready: asyncio.Future[None] = loop.create_future()

            def readable(fut: asyncio.Future[None] = ready) -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(self._notify_fd, readable)
            try:
                if self._u64(_COMMANDS) < target:
                    await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise RuntimeError(f"QEMU did not carry out the barrier commands {codes!r} "
                                   f"within {COMMAND_TIMEOUT} s") from None
            finally:
                loop.remove_reader(self._notify_fd)
            self._drain()
        if _U32.unpack_from(self._page, _COMMAND_ERROR)[0]:
            raise RuntimeError("QEMU's machine has no NVIC to set interrupts pending in")

    def release(self) -> None:
        """Let a held vCPU run on."""
        if self._release_fd >= 0:
            os.write(self._release_fd, b"g")

    async def wait_hold(self, after: int) -> None:
        """Until the plugin has held the vCPU more than ``after`` times (``holds`` read
        before resuming)."""
        loop = asyncio.get_running_loop()
        while self.holds <= after:
            ready: asyncio.Future[None] = loop.create_future()

            def readable(fut: asyncio.Future[None] = ready) -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(self._notify_fd, readable)
            try:
                if self.holds <= after:
                    await ready
            finally:
                loop.remove_reader(self._notify_fd)
            self._drain()

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._notify_fd, 4096):
                pass

"""The instruction gate, from the driver's side: count the instructions one QEMU executes
and hold its vCPU at a count (plugin/msplugin.c has the protocol and the reasons for it).

A counted run is: :meth:`InstructionGate.arm` with a limit while the VM is stopped,
resume it (gdbstub ``c``), and when the plugin holds the vCPU (:meth:`wait_hold`),
interrupt the VM with a ^C; the plugin lets the vCPU go once the VM stops, so it stops
at that block boundary. :meth:`release` lets a held vCPU run on instead (for barriers,
e.g. co-simulation). :meth:`disarm` after every stop.

The gate's other concerns are parts of it, each in its own module:

* ``gate.channel`` (:mod:`.gate_channel`): the control page and the FIFOs, and the
  page's layout;
* ``gate.sites`` (:mod:`.gate_traps`): the sites the plugin also holds the vCPU before
  (semihosting traps, see :mod:`.semihosting`; lock-step breakpoints);
* ``gate.stop_records``: what the plugin records at every VM stop (with ``-icount``):
  QEMU's instruction count, the pc, the virtual clock, so a stop needs no QMP
  ``query-replay`` and no gdbstub register read;
* ``gate.lockstep`` and ``gate.commands`` (:mod:`.gate_lockstep`): deadlines and
  watchpoints, barrier commands;
* ``gate.copies`` (:mod:`.gate_copies`): the plugin's copies of the lock-step watched
  ranges, made at every VM stop.

Apart from the gate's counting (armed for counted runs), the plugin counts every
instruction QEMU executes into the page's ``total`` (:attr:`InstructionGate.total`), an
inline add of each translated block's size at its start: no callback, ~0 % of the run
time (scripts/bench counts). The driver's instruction count without ``-icount`` is that
total, readable while QEMU runs (see :class:`.target.RunClock`).

Single vCPU: the count is the sum over all vCPUs, and a hold holds the one that
reached the limit.
"""

from __future__ import annotations

from machineserver.server.drivers.qemu.gate_channel import (
    ARMED,
    EXECUTED,
    FLAG_EXACT_STOP,
    FLAG_STOP_RECORD,
    FLAG_TOTAL,
    FLAG_WATCH_COPY,
    HOLDING,
    HOLDS,
    LIMIT,
    NEVER,
    REQUEST,
    STOP_ICOUNT,
    STOP_PC,
    STOPS,
    TOTAL,
    VCLOCK,
    GateChannel,
)
from machineserver.server.drivers.qemu.gate_copies import WatchedCopies
from machineserver.server.drivers.qemu.gate_lockstep import BarrierCommands, LockstepStops
from machineserver.server.drivers.qemu.gate_traps import HoldSites


class StopRecords:
    """What the plugin records at every VM stop."""

    def __init__(self, channel: GateChannel) -> None:
        self._channel = channel

    @property
    def recorded(self) -> bool:
        """The plugin records the instruction count and the pc at every VM stop."""
        return self._channel.flag(FLAG_STOP_RECORD)

    @property
    def stops(self) -> int:
        """VM stops so far (:attr:`vclock` is written before this is bumped)."""
        return self._channel.u64(STOPS)

    @property
    def vclock(self) -> int:
        """QEMU's virtual clock (ns) at the last VM stop."""
        return self._channel.u64(VCLOCK)

    @property
    def icount(self) -> int:
        """QEMU's instruction count at the last VM stop (what ``query-replay`` says)."""
        return self._channel.u64(STOP_ICOUNT)

    @property
    def pc(self) -> int:
        """The pc at the last VM stop."""
        return self._channel.u64(STOP_PC)


class InstructionGate:
    """One QEMU's gate. Create it (the FIFOs) before QEMU starts, pass
    :meth:`plugin_options` to the plugin, :meth:`attach` once QEMU is up.

    ``always``: the plugin keeps its counting callbacks registered from the start, for
    QEMU's single-threaded TCG loop (``-icount``), which has no vCPU resume callback to
    arm them on demand."""

    def __init__(self, directory: str, *, always: bool) -> None:
        self.always = always
        self.channel = GateChannel(directory)
        self.copies = WatchedCopies(directory)
        self.sites = HoldSites(self.channel)
        self.stop_records = StopRecords(self.channel)
        self.lockstep = LockstepStops(self.channel)
        self.commands = BarrierCommands(self.channel)
        self.counts_total = False  # the plugin counts into `total` (known once attached)

    def plugin_options(self) -> dict[str, str]:
        channel = self.channel
        options = {"gate": channel.ctl_path, "notify": channel.notify_path,
                   "release": channel.release_path, "command": channel.command_path,
                   "watched": self.copies.path}
        if self.always:
            options["always"] = "on"
        options["count"] = "block"
        return options

    def attach(self) -> None:
        """Map the control page the plugin made (QEMU is up). A page that is not the
        plugin's leaves the gate unusable rather than failing the machine."""
        if self.channel.attach() and self.channel.flag(FLAG_WATCH_COPY):
            self.copies.attach()
        self.counts_total = self.channel.flag(FLAG_TOTAL)

    def close(self) -> None:
        self.channel.close()
        self.copies.close()

    # ------------------------------------------------------------------ state
    @property
    def usable(self) -> bool:
        """Attached, and the plugin can stop the VM exactly at a hold (see msplugin.c)."""
        return self.channel.flag(FLAG_EXACT_STOP)

    @property
    def executed(self) -> int:
        """Instructions executed while counting (always, with ``always``)."""
        return self.channel.u64(EXECUTED)

    @property
    def total(self) -> int | None:
        """Instructions this QEMU has executed since it started, counted by the plugin
        (readable while it runs; closed: the last value read); None when the plugin does
        not count them."""
        return self.channel.u64(TOTAL) if self.counts_total else None

    @property
    def holds(self) -> int:
        """How many times the plugin has held the vCPU."""
        return self.channel.u64(HOLDS)

    @property
    def holding(self) -> bool:
        return bool(self.channel.u32(HOLDING))

    # ------------------------------------------------------------------ control
    def arm(self, limit: int) -> None:
        """Count, and hold once ``executed`` passes ``limit`` (at the end of the block
        that passes it: at most one block, <= 512 instructions, beyond). The VM must be
        stopped; the next resume applies it."""
        channel = self.channel
        assert channel.page is not None
        channel.drain()
        channel.put_u64(LIMIT, limit)
        if not self.always and not channel.u32(ARMED):
            channel.put_u32(ARMED, 1)
            channel.put_u64(REQUEST, channel.u64(REQUEST) + 1)

    def disarm(self) -> None:
        """No more holds; the counting callbacks go at the next resume (not with
        ``always``). Harmless when not armed."""
        channel = self.channel
        if channel.page is None:
            return
        channel.put_u64(LIMIT, NEVER)
        if not self.always and channel.u32(ARMED):
            channel.put_u32(ARMED, 0)
            channel.put_u64(REQUEST, channel.u64(REQUEST) + 1)

    def release(self) -> None:
        """Let a held vCPU run on."""
        self.channel.release()

    async def wait_hold(self, after: int) -> None:
        """Until the plugin has held the vCPU more than ``after`` times (``holds`` read
        before resuming)."""
        await self.channel.wait_notified(lambda: self.holds > after)

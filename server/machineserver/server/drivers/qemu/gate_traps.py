"""The sites the plugin's gate holds the vCPU before (see :mod:`.gate`, plugin/msplugin.c):
semihosting trap sites (see :mod:`.semihosting`) and, in lock-step, breakpoints; one table
in the control page for both. A hold there is answered like a counted run's, with a ^C,
and :meth:`HoldSites.take_pending_trap` says which site it was."""

from __future__ import annotations

from collections.abc import Iterable

from machineserver.server.drivers.qemu.gate_channel import (
    MAX_TRAPS,
    NBREAKS,
    NEVER,
    NTRAPS,
    PASS,
    PENDING,
    TRAPS,
    GateChannel,
)


class HoldSites:
    """The trap and breakpoint sites of one gate."""

    def __init__(self, channel: GateChannel) -> None:
        self._channel = channel
        self._traps: list[int] = []
        self._breaks: list[int] = []

    def set_traps(self, sites: Iterable[int]) -> None:
        """The semihosting trap sites the plugin holds the vCPU before (see
        msplugin.c). At most :data:`MAX_TRAPS`. The VM must be stopped."""
        addresses = sorted(sites)
        if len(addresses) + len(self._breaks) > MAX_TRAPS:
            raise ValueError(f"{len(addresses)} trap sites; the gate holds {MAX_TRAPS}")
        self._traps = addresses
        self._write()

    @property
    def break_sites(self) -> tuple[int, ...]:
        return tuple(self._breaks)

    def set_break_sites(self, sites: Iterable[int]) -> bool:
        """Breakpoints the plugin holds the vCPU before, like trap sites but whatever the
        instruction (lock-step: a gdbstub breakpoint's debug stop lets QEMU warp the
        virtual clock). The VM must be stopped; barrier command ``f`` (see
        :class:`.gate_lockstep.BarrierCommands`) flushes the translations made before.
        False when the list did not change."""
        addresses = sorted(set(sites))
        if addresses == self._breaks:
            return False
        if len(addresses) + len(self._traps) > MAX_TRAPS:
            raise ValueError(f"{len(addresses)} breakpoints; the gate holds "
                             f"{MAX_TRAPS - len(self._traps)} besides the trap sites")
        self._breaks = addresses
        self._write()
        return True

    def _write(self) -> None:
        channel = self._channel
        channel.put_u32(NTRAPS, 0)
        channel.put_u32(NBREAKS, 0)
        for i, address in enumerate(self._traps + self._breaks):
            channel.put_u64(TRAPS + 8 * i, address)
        channel.put_u32(NTRAPS, len(self._traps))
        channel.put_u32(NBREAKS, len(self._breaks))

    def take_pending_trap(self) -> int | None:
        """The trap site of the last trap hold, if one came since the last call."""
        if self._channel.page is None:
            return None
        site = self._channel.u64(PENDING)
        self._channel.put_u64(PENDING, NEVER)
        return None if site == NEVER else site

    def pass_trap(self, site: int | None) -> None:
        """Let the vCPU run the trap at ``site`` (None: none) without a hold: for the
        step that performs the call."""
        if self._channel.page is not None:
            self._channel.put_u64(PASS, NEVER if site is None else site)

"""The lock-step parts of the plugin's gate (see :mod:`.gate`, :mod:`.lockstep`,
plugin/msplugin.c): the plugin stops the VM itself at a virtual-clock deadline and at a
watchpoint hit, and QEMU's main loop carries out barrier commands (interrupts set
pending, translations flushed) sent through the command FIFO."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable

from machineserver.server.drivers.qemu.gate_channel import (
    COMMAND_ERROR,
    COMMANDS,
    DEADLINE,
    FLAG_LOCKSTEP,
    HIT,
    HIT_ACCESS,
    HIT_ADDRESS,
    HIT_PC,
    IDLE,
    IRQ_LINES,
    IRQS,
    MAX_WATCH,
    NEVER,
    NWATCH,
    REACHED,
    WATCH,
    GateChannel,
)

COMMAND_TIMEOUT = 2.0
COMMAND_SPINS = 20  # passes of the event loop before waiting on the notify FIFO


class LockstepStops:
    """Where the plugin stops the VM in lock-step: a deadline, a watchpoint hit."""

    def __init__(self, channel: GateChannel) -> None:
        self._channel = channel

    @property
    def usable(self) -> bool:
        """The plugin can stop the VM at a virtual-clock deadline (see msplugin.c)."""
        return self._channel.flag(FLAG_LOCKSTEP)

    def set_deadline(self, ns: int | None) -> None:
        """Stop the VM when its virtual clock reaches ``ns`` (None: never); applied when
        the VM next starts running. The VM must be stopped."""
        if self._channel.page is not None:
            self._channel.put_u64(DEADLINE, NEVER if ns is None else ns)

    @property
    def deadlines_reached(self) -> int:
        return self._channel.u64(REACHED)

    @property
    def idle_at_deadline(self) -> bool:
        """Whether the vCPU slept (WFI, nothing pending) at the last deadline."""
        return self._channel.page is not None and bool(self._channel.u32(IDLE))

    def set_watches(self, watches: Iterable[tuple[int, int, int]]) -> None:
        """Lock-step watchpoints (address, size, WATCH_WRITE|WATCH_READ bits), checked by
        the plugin after each access; flush (barrier command ``f``) after a change."""
        page = self._channel.page
        assert page is not None
        items = list(watches)[:MAX_WATCH]
        self._channel.put_u32(NWATCH, 0)
        for i, (address, size, access) in enumerate(items):
            struct.pack_into("<QII", page, WATCH + 16 * i, address, size, access)
        self._channel.put_u32(NWATCH, len(items))

    def take_hit(self) -> tuple[int, int, int] | None:
        """The lock-step watchpoint hit since the last call: (watched address, pc of the
        accessing instruction, WATCH_WRITE or WATCH_READ), or None."""
        channel = self._channel
        if channel.page is None or not channel.u32(HIT):
            return None
        hit = (channel.u64(HIT_ADDRESS), channel.u64(HIT_PC), channel.u32(HIT_ACCESS))
        channel.put_u32(HIT, 0)
        return hit


class BarrierCommands:
    """Commands QEMU's main loop carries out while the VM is stopped: ``i`` set the
    interrupts marked by :meth:`set_irqs` pending, ``f`` flush the translations."""

    def __init__(self, channel: GateChannel) -> None:
        self._channel = channel

    def set_irqs(self, lines: Iterable[int]) -> bool:
        """Mark external interrupt lines for command ``i``; False when none."""
        words = [0] * (IRQ_LINES // 32)
        for line in lines:
            words[line // 32] |= 1 << (line % 32)
        for i, bits in enumerate(words):
            self._channel.put_u32(IRQS + 4 * i, bits)
        return any(words)

    async def run(self, codes: bytes) -> None:
        """Have QEMU's main loop carry out ``codes`` (the VM stopped). Waits until it has
        (woken through the notify FIFO, no polling).
        RuntimeError when QEMU does not answer in time or has no NVIC."""
        channel = self._channel
        assert channel.page is not None
        target = channel.u64(COMMANDS) + len(codes)
        channel.put_u32(COMMAND_ERROR, 0)
        channel.drain()
        channel.send_commands(codes)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMMAND_TIMEOUT
        # QEMU's main loop usually answers within a few passes of ours; else wait for the
        # byte the plugin writes to the notify FIFO once it has carried them out
        for _ in range(COMMAND_SPINS):
            if channel.u64(COMMANDS) >= target:
                break
            await asyncio.sleep(0)
        try:
            await channel.wait_notified(lambda: channel.u64(COMMANDS) >= target, deadline)
        except TimeoutError:
            raise RuntimeError(f"QEMU did not carry out the barrier commands {codes!r} "
                               f"within {COMMAND_TIMEOUT} s") from None
        if channel.u32(COMMAND_ERROR):
            raise RuntimeError("QEMU's machine has no NVIC to set interrupts pending in")

"""Console input of a QEMU machine: bytes into the UART's chardev socket."""

from __future__ import annotations

from machineserver.server.drivers.base import BackendFailed, ConsoleInput, MachineState
from machineserver.server.drivers.qemu.target import QemuTarget


class QemuConsole(ConsoleInput):
    """Input is taken while the machine is HALTED (QEMU buffers it until the guest reads)
    or RUNNING."""

    def __init__(self, target: QemuTarget) -> None:
        self.target = target

    async def console_input(self, data: bytes) -> None:
        self.target.require(MachineState.HALTED, MachineState.RUNNING)
        inst = self.target.process.instance
        if inst is None or not inst.alive:
            raise BackendFailed("QEMU is not running")
        try:
            await inst.console_write(data)
        except (OSError, TimeoutError) as exc:
            raise BackendFailed(f"console write failed: {exc}") from None

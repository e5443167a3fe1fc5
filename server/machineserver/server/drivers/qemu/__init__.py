"""The QEMU backend: ``qemu-system-arm`` / ``qemu-system-riscv32`` child processes,
controlled over QMP, debugged over their gdbstub with our own RSP client, with the
console on a chardev socket."""

from machineserver.server.drivers.qemu.backend import QemuBackend
from machineserver.server.drivers.qemu.machine import QemuMachine

__all__ = ["QemuBackend", "QemuMachine"]

"""What a QEMU machine uses on the host: its QEMU process (for session metrics)."""

from __future__ import annotations

from collections.abc import Sequence

from machineserver.server.drivers.base import HostFootprint
from machineserver.server.drivers.qemu.process import QemuProcess


class QemuFootprint(HostFootprint):
    def __init__(self, process: QemuProcess) -> None:
        self.process = process

    def host_process_ids(self) -> Sequence[int]:
        """The QEMU process while it runs."""
        return self.process.pids()

"""Host footprint of a Unicorn machine: it runs in the server's process, on the run loop's
worker thread while it emulates (none while halted)."""

from __future__ import annotations

from collections.abc import Sequence

from machineserver.server.drivers.base import HostFootprint
from machineserver.server.drivers.unicorn.run_control import UnicornRunControl


class UnicornFootprint(HostFootprint):
    def __init__(self, run_control: UnicornRunControl) -> None:
        self._run_control = run_control

    def host_thread_ids(self) -> Sequence[int]:
        tid = self._run_control.worker_thread_id()
        return [tid] if tid is not None else []

"""The QEMU driver tests' ``machines`` fixture: it makes QEMU machines (skipped, or
failed under scripts/test, where the board's QEMU is missing), powers off every one a
test made, and fails the test if a QEMU child of this process is left behind."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from machineserver.server.drivers.base import MachineOptions
from machineserver.server.drivers.qemu import QemuBackend, QemuMachine
from tests.drivers.qemu_helpers import MachineFactory, Qm
from tests.helpers.backends import no_qemu_left_behind, require_backend
from tests.helpers.events import Recorder
from tests.helpers.machines import board


@pytest.fixture
async def machines() -> AsyncIterator[MachineFactory]:
    made: list[QemuMachine] = []
    backend = QemuBackend()

    def make(board_name: str, *, icount: bool = False, extra_args: tuple[str, ...] = (),
             **extra: str) -> tuple[Qm, Recorder]:
        """A machine (OFF); ``extra``: MachineOptions.extra; ``extra_args``: appended to
        QEMU's command line (a QemuMachine knob the API never reaches)."""
        require_backend("qemu", board_name)
        events = Recorder()
        options = MachineOptions(icount=icount, extra=extra)
        spec = board(board_name)
        m = (QemuMachine(spec, options, events, binary=backend.binaries[spec.arch], extra_args=extra_args)
             if extra_args else backend.create_machine(spec, options, events))
        assert isinstance(m, QemuMachine)
        made.append(m)
        return Qm(m), events

    with no_qemu_left_behind():
        yield make
        for m in made:
            await m.power_off()
        await backend.aclose()  # its warm spare QEMUs, if a board was started often enough

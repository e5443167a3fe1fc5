"""What only the Unicorn driver tests (tests/drivers/test_unicorn_*.py) share: a
Unicorn machine powered on with a test firmware loaded. Everything not Unicorn's own
(firmware and symbols, boards and images, the parts, the event recorder) is in
tests/helpers."""

from __future__ import annotations

from typing import Any

from machineserver.server.drivers.base import Machine, MachineOptions
from machineserver.server.drivers.unicorn import UnicornBackend
from tests.helpers.events import Recorder
from tests.helpers.firmware import firmware
from tests.helpers.machines import Parts, board, elf_image


async def start(board_name: str, program: str, **opts: Any) -> tuple[Machine, Parts, Recorder]:
    """A powered-on machine with ``program`` loaded (``opts``: MachineOptions fields):
    the machine, its parts, its events."""
    rec = Recorder()
    m = UnicornBackend().create_machine(board(board_name), MachineOptions(**opts), rec)
    await m.power_on()
    await m.load(elf_image(firmware(board_name, program)))
    return m, Parts(m), rec

"""The project's own firmware behaviours (tests/firmware/EXPECTED.md), written the way a
firmware team writes them with the machineserver pytest plugin: a ``machine`` fixture, console
expectations with timeouts in the machine's own time. Every module here marks its tests
``backend("unicorn", "qemu")``, so each runs on both backends (conformance for free);
``--ms-backends`` narrows that. The plugin's server is the one it starts in this process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.firmware import firmware

BOTH_BACKENDS = pytest.mark.backend("unicorn", "qemu")


@pytest.fixture
def fw(machine: object) -> Callable[[str], Path]:
    """``fw("hello")``: the test firmware image for the machine's board (built by make on
    demand; a missing cross compiler skips, or fails under scripts/test)."""
    board = machine.board  # type: ignore[attr-defined]
    return lambda program: firmware(board, program)

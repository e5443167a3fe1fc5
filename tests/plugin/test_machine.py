"""machineserver.testing.Machine through the plugin's fixtures in this process: an explicit
capsule, exported by the plugin and reopened, is the machine at that instant."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from machineserver.sdk import Client
from machineserver.testing import Machine, Virtual
from machineserver.v1 import capsule_pb2, common_pb2
from tests.helpers.firmware import firmware

BOARD = "mps2-an385"
pytestmark = [pytest.mark.board(BOARD), pytest.mark.backend("unicorn", "qemu")]


def test_an_explicit_capsule_reopens_at_the_same_instant(machine: Machine, ms_client: Client,
                                                          tmp_path: Path) -> None:
    machine.load(firmware(BOARD, "systick"), run=False)
    machine.run_until("SysTick_Handler", timeout=Virtual(ms=100))
    regs = machine.registers.all()
    path = machine.capsule("a look at the first tick", path=tmp_path / "tick.capsule")
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("manifest.json"))
    assert manifest["capsule"]["trigger"] == "explicit" and manifest["capsule"]["reason"] == "a look at the first tick"
    assert manifest["capsule"]["pc"] == regs["pc"] == machine.symbol("SysTick_Handler") & ~1

    data = path.read_bytes()
    imported = ms_client.capsules.import_capsule(
        iter([capsule_pb2.ImportCapsuleRequest(chunk=data[i:i + 65536]) for i in range(0, len(data), 65536)])).capsule
    opened = ms_client.capsules.open_capsule(name=imported.name).session
    try:
        assert opened.state == common_pb2.SESSION_STATE_HALTED and opened.backend == machine.backend
        again = {r.name: r.value for r in ms_client.debug.read_registers(name=opened.name).registers}
        assert again == regs
        ticks = machine.symbol("ticks")
        assert ms_client.debug.read_memory(name=opened.name, address=ticks, size=4).data == machine.read("ticks")
    finally:
        ms_client.sessions.delete_session(name=opened.name)

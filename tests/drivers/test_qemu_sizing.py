"""What a QEMU session costs in memory (drivers/qemu/sizing.py), on real QEMUs: measured
once, kept in memory and in the cache file, close to what a powered-on machine's QEMU
really holds; reported by CapabilitiesService for every board QEMU runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.drivers.base import Arch, BoardSpec
from machineserver.server.drivers.qemu import QemuBackend, sizing
from machineserver.server.drivers.qemu.launch import LaunchSpec
from machineserver.server.drivers.qemu.sizing import DRIVER_SHARE, FootprintMeter, private_and_resident
from tests.drivers.qemu_helpers import MachineFactory
from tests.helpers.backends import no_qemu_left_behind, qemu_children, require_backend

MIB = 1024 * 1024
SPEC = LaunchSpec("qemu-system-arm", "mps2-an385", Arch.ARM_CORTEX_M)


@pytest.fixture
def qemu_reaped() -> Iterator[None]:
    require_backend("qemu", "mps2-an385")
    with no_qemu_left_behind():
        yield


async def test_measured_once_and_close_to_a_real_machines_qemu(
        qemu_reaped: None, tmp_path: Path, machines: MachineFactory) -> None:
    meter = FootprintMeter(cache_dir=tmp_path)
    found = await meter.footprint(SPEC, "7.2")
    assert found is not None and found.basis.startswith("measured on this host: qemu-system-arm 7.2, mps2-an385")
    # a powered-on machine's QEMU (its program loaded) holds about as much of its own
    m, _ = machines("mps2-an385")
    await m.power_on()
    own = private_and_resident(m.qemu_pid)
    assert own is not None
    assert 0.5 < (found.memory_bytes - DRIVER_SHARE) / own[0] < 2.0, (found, own)
    assert 2 * MIB < found.memory_bytes < 200 * MIB
    # the second request is answered from memory, and a new meter from the cache file:
    # neither starts a QEMU
    before = {p.pid for p in qemu_children()}
    assert await meter.footprint(SPEC) == found
    assert await FootprintMeter(cache_dir=tmp_path).footprint(SPEC) == found
    assert {p.pid for p in qemu_children()} == before
    assert (tmp_path / sizing.CACHE_FILE).exists()


async def test_a_qemu_that_cannot_be_measured_gives_none(tmp_path: Path) -> None:
    meter = FootprintMeter(cache_dir=tmp_path)
    assert await meter.footprint(LaunchSpec("no-such-qemu", "mps2-an385", Arch.ARM_CORTEX_M)) is None
    no_qemu_machine = BoardSpec(name="nothing", description="", arch=Arch.ARM_CORTEX_M, cpu="cortex-m3",
                                cpu_mhz=25.0, memory=())
    assert await QemuBackend(spares=0).memory_footprint(no_qemu_machine) is None
    # a QEMU that does not start (an unknown machine) is not measured either
    assert await meter.footprint(LaunchSpec("qemu-system-arm", "no-such-machine", Arch.ARM_CORTEX_M)) is None


async def test_capabilities_report_every_qemu_boards_footprint(qemu_reaped: None, client: AsyncClient) -> None:
    caps = await client.capabilities.get_capabilities()
    by_backend = {b.name: b for b in caps.backends}
    qemu = by_backend["qemu"]
    footprints = {f.board: f for f in qemu.board_footprints}
    assert set(footprints) == set(qemu.boards) and footprints
    for f in footprints.values():
        assert 2 * MIB < f.memory_bytes < 200 * MIB and f.basis.startswith("measured"), f
    again = await client.capabilities.get_capabilities()
    assert list(again.backends) == list(caps.backends)

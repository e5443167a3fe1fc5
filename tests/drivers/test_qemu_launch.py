"""Starting QEMU (drivers/qemu/launch.py, instance.py), on real QEMUs: a start makes
every connection and leaves QEMU halted with its register map and gate; QEMU gets no
transparent huge pages while this process keeps its own setting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from machineserver.server.drivers.base import Arch, MachineState
from machineserver.server.drivers.qemu.instance import PR_GET_THP_DISABLE, _prctl
from machineserver.server.drivers.qemu.launch import LaunchSpec, launch
from tests.drivers.qemu_helpers import MachineFactory
from tests.helpers.backends import no_qemu_left_behind, require_backend


def thp_enabled(pid: int | str) -> int:
    """What /proc/PID/status says of transparent huge pages (1: allowed, 0: disabled)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("THP_enabled:"):
            return int(line.split()[1])
    pytest.skip("this kernel does not report THP_enabled")


async def test_qemu_runs_without_huge_pages_and_this_process_keeps_its_own(machines: MachineFactory) -> None:
    ours = thp_enabled("self")
    m, _ = machines("mps2-an385")
    await m.power_on()
    assert thp_enabled(m.qemu_pid) == 0
    assert thp_enabled("self") == ours and _prctl(PR_GET_THP_DISABLE) == (0 if ours else 1)
    assert m.state is MachineState.HALTED


async def test_concurrent_launches_restore_the_setting_once() -> None:
    """Starts overlap (spares and sessions): the flag is set while any spawns, and this
    process's own value comes back after the last."""
    require_backend("qemu", "mps2-an385")
    ours = thp_enabled("self")
    spec = LaunchSpec("qemu-system-arm", "mps2-an385", Arch.ARM_CORTEX_M)
    with no_qemu_left_behind():
        started = await asyncio.gather(*(launch(spec, on_console=lambda _: None, on_exit=lambda *_: None)
                                         for _ in range(3)))
        try:
            for one in started:
                assert one.instance.proc is not None and thp_enabled(one.instance.proc.pid) == 0
                # every connection made, the register map read, the gate attached
                assert one.instance.qmp is not None and one.instance.rsp is not None
                assert one.regmap.resolve("pc") is not None and one.regmap.g_size > 0
                assert one.gate is None or one.gate.usable
            assert len({one.instance.proc.pid for one in started if one.instance.proc}) == 3
        finally:
            for one in started:
                await one.discard()
    assert thp_enabled("self") == ours

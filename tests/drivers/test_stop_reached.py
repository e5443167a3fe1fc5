"""RunControl.stop_reached: the stop an EXITED or FAULTED machine ended at, exit code
included, for a caller whose cancelled step never saw it (the core asks after a cancelled
operation, so the session is not left EXITED with no exit code: a CI run saw that once,
an ExpectConsole's step cancelled as the mmio firmware exited)."""

from __future__ import annotations

from machineserver.server.drivers.base import MachineState, StopReason
from tests.drivers.unicorn_helpers import start


async def test_an_exited_machine_tells_its_exit_stop() -> None:
    m, p, _ = await start("lm3s6965evb", "hello")
    try:
        assert await p.run.stop_reached() is None  # halted: no such stop
        stop = await p.run.step(10_000_000)  # runs to the exit inside one step
        assert stop.reason is StopReason.EXIT and m.state is MachineState.EXITED
        reached = await p.run.stop_reached()
        assert reached is not None and reached.reason is StopReason.EXIT and reached.exit_code == 0
        assert reached.pc == stop.pc
        await m.reset()
        assert await p.run.stop_reached() is None  # halted again
    finally:
        await m.power_off()


async def test_the_fault_firmwares_end_is_told_as_it_came() -> None:
    m, p, rec = await start("lm3s6965evb", "fault")
    try:
        await p.run.run()
        stop = await rec.wait_stop()  # its handler reports the fault and exits with a code
        assert stop.reason in (StopReason.EXIT, StopReason.FAULT)
        assert await p.run.stop_reached() == stop
    finally:
        await m.power_off()

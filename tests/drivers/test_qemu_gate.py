"""The plugin's instruction gate on a real QEMU, below run control: it counts only when
armed, holds the vCPU at a count, and a held vCPU can be let go on (a barrier, as
co-simulation will use it) or stopped exactly there (a counted run)."""

from __future__ import annotations

import pytest

from machineserver.server.drivers.base import MachineState, StopReason
from machineserver.server.drivers.qemu.plugin import plugin_args
from machineserver.server.drivers.qemu.stops import SIGINT
from tests.drivers.qemu_helpers import MachineFactory, boot, halted_at, usable_gate

HOLD_WAIT_S = 20.0


def test_plugin_arguments_refuse_commas() -> None:
    assert plugin_args("/p/ms.so", {"gate": "/t/g"}) == ["-plugin", "file=/p/ms.so,gate=/t/g"]
    with pytest.raises(ValueError, match="comma"):
        plugin_args("/p/ms.so", {"out": "/t/a,b"})


async def test_an_unarmed_gate_counts_nothing(machines: MachineFactory) -> None:
    """Without icount the counting callbacks exist only while armed: a plain run of
    crc32 (~55 M instructions) adds nothing to the count; its one hold is before the
    exit's trap."""
    m, ev, _ = await boot(machines, "mps2-an385", "crc32")
    gate = usable_gate(m)
    assert not gate.always
    before = gate.executed
    await m.run.run()
    stop = await ev.next_stop()
    assert stop.reason is StopReason.EXIT and m.process.alive
    assert gate.executed == before and gate.holds == 1


@pytest.mark.parametrize("icount", [False, True])
async def test_a_held_vcpu_goes_on_when_released(machines: MachineFactory, icount: bool) -> None:
    m, ev, _ = await halted_at(machines, "mps2-an385", "crc32", "main", icount=icount)
    gate = usable_gate(m)
    assert gate.always == icount
    stub = m.process.stub()
    start, holds = gate.executed, gate.holds
    gate.arm(start + 1_000_000)
    await stub.send_continue(b"c")
    await gate.wait_hold(holds)
    assert gate.holding
    # held at the end of the block that passed the limit: at most one block beyond it
    assert start + 1_000_000 < gate.executed <= start + 1_000_000 + 512
    held_at = gate.executed
    gate.disarm()
    gate.release()  # a barrier passed: run on, to the program's exit trap...
    await gate.wait_hold(holds + 1)  # ...where the plugin holds before it
    (site,) = m.machine.traps.sites
    assert gate.sites.take_pending_trap() == site
    stub.interrupt()
    reply = await stub.wait_stop(HOLD_WAIT_S)
    assert reply.signal == SIGINT and not gate.holding
    pc = (await m.regs.read_registers(["pc"]))["pc"]
    assert pc <= site < pc + 64  # at the start of the block that ends with the trap
    if icount:
        assert gate.executed > held_at + 50_000_000  # counted on: crc32 ran to its end
    # the machine goes on from there: stepping onto the trap is the exit
    stop = await m.run.step(40)
    assert (stop.reason, stop.exit_code, stop.pc) == (StopReason.EXIT, 0, site)
    assert bytes(ev.console) == b"crc32=0x80f45f04\n"


async def test_a_held_vcpu_stops_exactly_at_the_hold(machines: MachineFactory) -> None:
    """^C while held: the plugin lets the vCPU go once the VM is stopping, and it stops
    at that block boundary: the stop reply comes, and the count does not move on."""
    m, _, _ = await halted_at(machines, "mps2-an385", "crc32", "main")
    gate = usable_gate(m)
    stub = m.process.stub()
    holds = gate.holds
    gate.arm(gate.executed + 200_000)
    await stub.send_continue(b"c")
    await gate.wait_hold(holds)
    held_at = gate.executed
    stub.interrupt()
    reply = await stub.wait_stop(HOLD_WAIT_S)
    gate.disarm()
    assert reply.signal == SIGINT and not gate.holding
    assert gate.executed == held_at
    assert m.state is MachineState.HALTED

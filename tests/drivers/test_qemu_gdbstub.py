"""The QEMU driver on the RSP library (machineserver.server.rsp), against real QEMUs: a
call abandoned while its reply is owed leaves the gdbstub stream in step (the late reply
is thrown away, never handed to the next call); a reply that never comes (a stuck QEMU),
a BROKEN client and a request made while a stop reply is owed each fail the machine once,
with the reason, and kill QEMU; a refusal is still only a refusal."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from machineserver.server.drivers.base import (
    BackendFailed,
    BadRequest,
    MachineState,
    StopReason,
)
from machineserver.server.drivers.qemu.target import QemuTarget, guarded
from machineserver.server.rsp import RspError, RspProtocolError, RspTimeout, State
from machineserver.server.rsp.codec import CodecError
from tests.drivers.qemu_helpers import MachineFactory, Qm, boot, failed_once, halted_at
from tests.helpers.firmware import elf_address

SRAM = 0x2000_0000  # mps2-an385
ABANDON_AFTER_S = 0.3  # long enough for the request to be on the wire


async def abandoned_read(m: Qm, address: int) -> None:
    """A memory read whose caller gives up (a deadline) while QEMU is stopped: the read's
    reply stays owed."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(m.mem.read_memory(address, 4), ABANDON_AFTER_S)
    assert m.process.stub().reply_owed


async def test_an_abandoned_read_leaves_the_stream_in_step(machines: MachineFactory) -> None:
    """QEMU answers the abandoned read once it runs again; the next calls get their own
    replies (the old client handed that late memory reply to the register read)."""
    m, ev, path = await halted_at(machines, "mps2-an385", "crc32", "main")
    await m.mem.write_memory(SRAM + 0x100, b"\x11\x22\x33\x44")
    before = await m.regs.read_registers(["pc", "sp", "lr"])
    pid = m.qemu_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        await abandoned_read(m, SRAM + 0x100)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert await m.regs.read_registers(["pc", "sp", "lr"]) == before
    assert before["pc"] == elf_address(path, "main")
    assert await m.mem.read_memory(SRAM + 0x100, 4) == b"\x11\x22\x33\x44"
    stub = m.process.stub()
    assert stub.discarded == 1 and not stub.reply_owed and stub.state is State.IDLE
    stop = await m.run.step(3)  # and run control goes on in step with it
    assert stop.reason is StopReason.STEP and m.state is MachineState.HALTED
    assert ev.failures == []


async def test_a_reply_that_never_comes_is_a_stuck_qemu(machines: MachineFactory) -> None:
    """The next call first waits for the owed reply, within its own timeout; QEMU stays
    stopped: it stopped answering, and the machine FAILED so, QEMU killed."""
    m, ev, _ = await boot(machines, "mps2-an385", "echo")
    pid = m.qemu_pid
    os.kill(pid, signal.SIGSTOP)
    await abandoned_read(m, SRAM)
    stub = m.process.stub()
    with pytest.raises(BackendFailed, match="stopped answering"):
        await m.regs.read_registers(["pc"])
    assert stub.closed and stub.discarded == 0
    await failed_once(m, ev, pid, "stopped answering")


async def test_a_broken_client_fails_the_machine(machines: MachineFactory) -> None:
    """A client that went BROKEN (here behind the driver's back) raises RspStateError on
    every call: the driver's next call fails the machine with the reason."""
    m, ev, _ = await boot(machines, "mps2-an385", "echo")
    pid = m.qemu_pid
    stub = m.process.stub()
    stub.resync_timeout = 0.2
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(RspTimeout):
            await stub.request(b"g", timeout=0.2)
        with pytest.raises(RspProtocolError, match="did not come"):
            await stub.request(b"g")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert stub.state is State.BROKEN
    with pytest.raises(BackendFailed, match=r"cannot be trusted any more.*broken"):
        await m.mem.read_memory(SRAM, 4)
    await failed_once(m, ev, pid, "cannot be trusted any more")


async def test_a_request_while_a_stop_reply_is_owed_fails_the_machine(machines: MachineFactory) -> None:
    """The client refuses requests while the target runs (RspStateError, RUNNING); in the
    driver that is a bug (here QEMU is resumed behind its back): FAILED, saying so."""
    m, ev, _ = await boot(machines, "mps2-an385", "echo")
    pid = m.qemu_pid
    stub = m.process.stub()
    await stub.send_continue(b"c")
    with pytest.raises(BackendFailed, match=r"out of turn.*RUNNING"):
        await m.regs.read_registers(["pc"])
    await failed_once(m, ev, pid, "out of turn")


class _Part:
    """A part of the machine whose method raises what it is given, at the boundary."""

    def __init__(self, target: QemuTarget) -> None:
        self.target = target

    @guarded
    async def call(self, exc: Exception) -> None:
        raise exc


@pytest.mark.parametrize(("exc", "reason"), [
    (RspError("m at 0x20000000: E14", 0x14), "refused a request"),
    (CodecError("not hex: 'zz'"), "cannot be read"),
])
async def test_the_boundary_fails_the_machine_on_errors_injected(
        machines: MachineFactory, exc: Exception, reason: str) -> None:
    """What QEMU 7.2 never sends (an unexpected refusal, a stop reply that cannot be
    read), raised inside a part's method: no rsp error escapes it."""
    m, ev, _ = await boot(machines, "mps2-an385", "echo")
    pid = m.qemu_pid
    with pytest.raises(BackendFailed, match=reason):
        await _Part(m.machine.target).call(exc)
    await failed_once(m, ev, pid, reason)


async def test_a_refusal_stays_a_refusal(machines: MachineFactory) -> None:
    """An Exx reply is the caller's error, not QEMU's: BadRequest naming the address QEMU
    refused (from RspError.address), the machine untouched."""
    m, ev, _ = await boot(machines, "mps2-an385", "echo")
    with pytest.raises(BadRequest, match="0x90000000 is not mapped") as err:
        await m.mem.read_memory(0x9000_0000, 4)
    assert err.value.field == "address"
    assert m.state is MachineState.HALTED and ev.failures == []
    assert m.process.stub().state is State.IDLE

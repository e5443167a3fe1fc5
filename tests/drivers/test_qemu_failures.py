"""How the QEMU driver fails: a stuck (SIGSTOPped) or killed QEMU leaves the machine
FAILED, reported once, the process gone, and a power cycle brings it back; failure
reasons carry only what explains the death (a guest lockup is a fault that names it);
the gdbstub handshake claims no Arm registers on RISC-V."""

from __future__ import annotations

import os
import signal

import pytest

from machineserver.server.drivers.base import BackendFailed, MachineState, StopReason
from machineserver.server.drivers.qemu.instance import explaining_lines
from tests.drivers.qemu_helpers import MachineFactory, boot, failed_once

# --------------------------------------------------------------------------- stuck QEMU


async def test_a_stopped_qemu_while_halted_fails_the_machine_and_is_killed(
        machines: MachineFactory) -> None:
    m, ev, _ = await boot(machines, "mps2-an385", "echo")
    pid = m.qemu_pid
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(BackendFailed, match="stopped answering"):
        await m.regs.read_registers(["pc"])
    assert ev.stops == []
    await failed_once(m, ev, pid, "stopped answering")


async def test_a_stopped_qemu_while_running_fails_the_pause(machines: MachineFactory) -> None:
    m, ev, _ = await boot(machines, "sifive_e", "echo")
    await m.run.run()
    await ev.until(lambda: b"echo ready\n" in ev.console)
    pid = m.qemu_pid
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(BackendFailed, match="did not stop"):
        await m.run.pause()
    await failed_once(m, ev, pid, "did not stop")


# --------------------------------------------------------------------------- failure reasons


def test_only_the_lines_that_explain_a_death_are_kept() -> None:
    stderr = [
        "Timer with period zero, disabling",  # a board model's chatter
        "qemu-system-arm: warning: nic lan9118.0 has no peer",
        "some guest or library noise",
        "qemu: fatal: Lockup: can't escalate 3 to HardFault (current priority -1)",
        "",
        "R00=00000000 R01=00000001 R02=00000002 R03=00000003",
        "R04=00000004 R05=00000005 R06=00000006 R07=00000007",
        "PSR=40000003 -Z-- T handler",
    ]
    assert explaining_lines(stderr) == [
        "qemu: fatal: Lockup: can't escalate 3 to HardFault (current priority -1)",
        "R00=00000000 R01=00000001 R02=00000002 R03=00000003",
    ]
    assert explaining_lines(["qemu-system-riscv32: terminating on signal 15 from pid 7 (x)",
                             "msplugin: cannot map the coverage table /x: No space left"]) == [
        "qemu-system-riscv32: terminating on signal 15 from pid 7 (x)",
        "msplugin: cannot map the coverage table /x: No space left"]


@pytest.mark.parametrize("board_name", ["lm3s6965evb", "mps2-an385", "sifive_e"])
async def test_a_killed_qemu_fails_the_machine_without_its_noise(machines: MachineFactory,
                                                                 board_name: str) -> None:
    """lm3s6965evb's QEMU prints "Timer with period zero, disabling" and mps2-an385's a
    warning about its NIC at every start: neither belongs in the reason it died."""
    m, ev, _ = await boot(machines, board_name, "echo")
    await m.run.run()
    await ev.until(lambda: b"echo ready\n" in ev.console)
    pid = m.qemu_pid
    os.kill(pid, signal.SIGKILL)
    await ev.until(lambda: bool(ev.failures))
    assert ev.failures == ["QEMU ended unexpectedly: killed by SIGKILL"] and ev.stops == []
    await failed_once(m, ev, pid, "killed by SIGKILL")


async def test_qemus_own_last_words_are_kept(machines: MachineFactory) -> None:
    m, ev, _ = await boot(machines, "lm3s6965evb", "echo")
    await m.run.run()
    await ev.until(lambda: b"echo ready\n" in ev.console)
    os.kill(m.qemu_pid, signal.SIGTERM)
    await ev.until(lambda: bool(ev.failures))
    (reason,) = ev.failures
    assert reason.startswith("QEMU ended unexpectedly: exit status 0: qemu-system-arm: terminating on "
                             "signal 15"), reason
    assert "Timer with period zero" not in reason


async def test_a_guest_lockup_is_a_fault_that_names_it(machines: MachineFactory) -> None:
    m, ev, _ = await boot(machines, "mps2-an385", "hello")
    # HardFault vector -> unmapped, then jump to unmapped: the fault escalation locks up
    await m.mem.write_memory(0x0C, (0xF0000001).to_bytes(4, "little"))
    await m.regs.write_register("pc", 0xF0000000)
    await m.run.run()
    stop = await ev.next_stop()
    assert stop.reason is StopReason.FAULT
    assert stop.message == "Lockup: can't escalate 3 to HardFault (current priority -1)"
    assert m.state is MachineState.FAULTED and ev.failures == []
    await m.reset()  # a fresh QEMU with the image reloaded
    await m.run.run()
    assert (await ev.next_stop()).reason is StopReason.EXIT


# --------------------------------------------------------------------------- handshake


@pytest.mark.parametrize("board_name,claim", [("sifive_e", b""), ("mps2-an385", b";xmlRegisters=arm")])
async def test_the_handshake_claims_arm_registers_only_on_arm(machines: MachineFactory,
                                                              board_name: str, claim: bytes) -> None:
    """QEMU traces the packets its gdbstub receives (-trace gdbstub_io_command)."""
    m, _ = machines(board_name, extra_args=("-trace", "gdbstub_io_command"))
    await m.power_on()
    inst = m.process.instance
    assert inst is not None
    received = [line for line in inst.stderr_tail if "Received: qSupported" in line]
    assert received == [f"gdbstub_io_command Received: qSupported:multiprocess+;swbreak+;hwbreak+"
                        f"{claim.decode()}"]

"""The gdbremote driver against real parts: a QEMU 7.2 started by each test with -S and
its gdbstub on a Unix socket (UART0 on another), driven as a remote target; and against
the scripted stub of tests/rsp for what a real target here cannot do (refuse Z1/Z2, have
no target description, answer garbage, hang up mid-call)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from machineserver.server.drivers.base import (
    BackendFailed,
    BadImage,
    Breakpoints,
    ConsoleInput,
    Coverage,
    MachineOptions,
    MachineState,
    MemoryAccess,
    NotSupported,
    RegisterAccess,
    RunControl,
    Snapshots,
    StopReason,
    WatchKind,
    Watchpoints,
)
from machineserver.server.drivers.discovery import discover_backends
from machineserver.server.drivers.gdbremote import GdbRemoteBackend, GdbRemoteMachine
from tests.helpers.events import Recorder
from tests.helpers.firmware import elf_address, firmware
from tests.helpers.machines import board, elf_image
from tests.rsp.stub import Stub

BOARD = "mps2-an385"


@contextlib.contextmanager
def qemu(tmp_path: Path, program: str) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """A QEMU halted at reset (-S), gdbstub and UART0 on Unix sockets, killed at the end."""
    binary = shutil.which("qemu-system-arm")
    if binary is None:
        pytest.skip("qemu-system-arm is not installed")
    gdb, con = str(tmp_path / "gdb.sock"), str(tmp_path / "con.sock")
    proc = subprocess.Popen(
        [binary, "-M", BOARD, "-display", "none", "-monitor", "none", "-S",
         "-gdb", f"unix:{gdb},server=on,wait=off",
         "-chardev", f"socket,id=con,path={con},server=on,wait=off", "-serial", "chardev:con",
         "-semihosting-config", "enable=on,target=native",
         "-kernel", str(firmware(BOARD, program))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(500):
            if Path(gdb).exists() and Path(con).exists():
                break
            if proc.poll() is not None:
                raise AssertionError(f"QEMU ended: {proc.stderr.read() if proc.stderr else b''!r}")
            time.sleep(0.01)
        yield f"unix:{gdb}", f"unix:{con}", proc
    finally:
        proc.kill()
        proc.wait(5)


@contextlib.asynccontextmanager
async def remote(tmp_path: Path, program: str, *, console: bool = True
                 ) -> AsyncIterator[tuple[GdbRemoteMachine, Recorder, Path, subprocess.Popen[bytes]]]:
    with qemu(tmp_path, program) as (target, con, proc):
        events = Recorder()
        extra = {"gdbremote.target": target, "gdbremote.console": con if console else ""}
        m = GdbRemoteBackend().create_machine(board(BOARD), MachineOptions(extra=extra), events)
        assert isinstance(m, GdbRemoteMachine)
        try:
            await m.power_on()
            path = firmware(BOARD, program)
            await m.load(elf_image(path))
            yield m, events, path, proc
        finally:
            await m.power_off()


def test_backend_is_registered_and_honest() -> None:
    assert "gdbremote" in [b.name for b in discover_backends()]
    info = GdbRemoteBackend().probe()
    assert info.available
    assert "not tested here" in info.details["tested_with"]
    assert "no peripheral state" in info.details["snapshots"]
    assert GdbRemoteBackend().board_support(board(BOARD)) is None


async def test_debug_session_on_a_qemu_gdbstub(tmp_path: Path) -> None:
    async with remote(tmp_path, "hello") as (m, events, path, _):
        details = m.details()
        assert details["registers"].startswith("17 (target.xml org.gnu.gdb.arm.m-profile")
        assert details["hardware_breakpoints"] == "yes"
        assert details["watchpoints"] == "write, read, access"
        assert details["monitor_reset"].startswith("yes: monitor system_reset"), details
        with pytest.raises(NotSupported, match="no execution trace"):
            m.capability(Coverage)
        main = elf_address(path, "main")
        await m.capability(Breakpoints).set_breakpoint(main)
        await m.capability(RunControl).run()
        stop = await events.next_stop()
        assert (stop.reason, stop.pc) == (StopReason.BREAKPOINT, main)
        regs = await m.capability(RegisterAccess).read_registers(["pc", "sp", "xpsr"])
        assert regs["pc"] == main and regs["xpsr"] & (1 << 24)
        code = await m.capability(MemoryAccess).read_memory(main, 64)
        assert code == elf_image(path).segments[0].data[main - elf_image(path).segments[0].address:][:64]
        await m.capability(MemoryAccess).write_memory(0x20000000, b"\x11\x22\x33\x44")
        assert await m.capability(MemoryAccess).read_memory(0x20000000, 4) == b"\x11\x22\x33\x44"
        await m.capability(Breakpoints).clear_breakpoint(main)
        step = await m.capability(RunControl).step(3)
        assert step.reason is StopReason.STEP and step.pc != main
        assert m.counters().instructions == 3 and not m.counters().exact
        # the next push onto the stack is a write watchpoint hit
        sp = (await m.capability(RegisterAccess).read_registers(["sp"]))["sp"]
        await m.capability(Watchpoints).set_watchpoint(sp - 4, 4, WatchKind.WRITE)
        await m.capability(RunControl).run()
        stop = await events.next_stop()
        assert stop.reason is StopReason.WATCHPOINT and stop.watch_address == sp - 4, stop
        await m.capability(Watchpoints).clear_watchpoint(sp - 4, 4, WatchKind.WRITE)
        await m.capability(RunControl).run()
        stop = await events.next_stop()
        assert stop.reason is StopReason.EXIT and stop.exit_code == 0, stop
        assert m.state is MachineState.EXITED
        await events.wait_console(b"Hello from mps2-an385!\n")


async def test_console_input_and_pause(tmp_path: Path) -> None:
    async with remote(tmp_path, "echo") as (m, events, _, _):
        await m.capability(RunControl).run()
        await events.wait_console(b"echo ready\n")
        await m.capability(ConsoleInput).console_input(b"abc")
        await events.wait_console(b"abc")
        halt = await m.capability(RunControl).pause()
        assert halt.reason is StopReason.HALT and m.state is MachineState.HALTED
        await m.capability(RunControl).run()
        await m.capability(ConsoleInput).console_input(b"q")
        stop = await events.next_stop()
        assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0)
        await events.wait_console(b"bye\n")


async def test_soft_snapshot_round_trip(tmp_path: Path) -> None:
    async with remote(tmp_path, "hello", console=False) as (m, _, _, _):
        with pytest.raises(NotSupported, match="no console endpoint"):
            m.capability(ConsoleInput)
        await m.capability(RunControl).step(5)
        snap = m.capability(Snapshots)
        blob = await snap.save_state()
        before = await m.capability(RegisterAccess).read_registers()
        assert b"peripheral state" in blob[:4096]
        await m.capability(MemoryAccess).write_memory(0x20000000, b"\xde\xad\xbe\xef")
        await m.capability(RunControl).step(7)
        await snap.restore_state(blob)
        assert await m.capability(RegisterAccess).read_registers() == before
        assert await m.capability(MemoryAccess).read_memory(0x20000000, 4) != b"\xde\xad\xbe\xef"


async def test_qemu_killed_means_failed_with_the_reason(tmp_path: Path) -> None:
    async with remote(tmp_path, "echo") as (m, events, _, proc):
        await m.capability(RunControl).run()
        await events.wait_console(b"echo ready\n")
        proc.kill()
        await events.until(lambda: events.failures)
        assert m.state is MachineState.FAILED
        assert "lost the remote target" in events.failures[0]
        with pytest.raises(BackendFailed):
            await m.capability(RegisterAccess).read_registers(["pc"])
        assert len(events.failures) == 1


# --------------------------------------------------------------------------- scripted stub

ARM_XML = (b'<?xml version="1.0"?><target><architecture>arm</architecture>'
           b'<feature name="org.gnu.gdb.arm.m-profile">'
           + b"".join(b'<reg name="r%d" bitsize="32"/>' % i for i in range(13))
           + b'<reg name="sp" bitsize="32"/><reg name="lr" bitsize="32"/><reg name="pc" bitsize="32"/>'
           b'<reg name="xpsr" bitsize="32" regnum="25"/></feature></target>')


def small_target(*, xml: bytes = ARM_XML, garbage_on: bytes = b"", hang_up_on: bytes = b"") -> Stub:
    """A stub of a Cortex-M that halts at 0x100 and refuses Z1, Z2-Z4, X and qRcmd."""
    async def script(stub: Stub, payload: bytes) -> None:
        if garbage_on and payload.startswith(garbage_on):
            stub.write(b"garbage!")
        elif hang_up_on and payload.startswith(hang_up_on):
            stub.hang_up()
        elif payload.startswith(b"qXfer:features:read:target.xml:"):
            stub.send(b"l" + xml)
        elif payload == b"?":
            stub.send(b"S05")
        elif payload.startswith(b"p"):
            stub.send(b"00010000" if payload == b"pf" else b"00000000")
        elif payload.startswith(b"m"):
            size = int(payload.split(b",")[1], 16)
            stub.send(b"00" * size)
        elif payload.startswith(b"Z0") or payload.startswith(b"z0"):
            stub.send(b"OK")
        else:
            stub.send(b"")  # Z1..Z4, X, qRcmd, ...: not supported
    return Stub(script)


def stub_machine(port: int) -> tuple[GdbRemoteMachine, Recorder]:
    events = Recorder()
    m = GdbRemoteMachine(board(BOARD), MachineOptions(extra={"gdbremote.target": f"127.0.0.1:{port}"}),
                         events)
    return m, events


async def test_a_target_without_z1_and_watchpoints_says_so() -> None:
    async with small_target() as stub:
        m, _ = stub_machine(stub.port)
        try:
            await m.power_on()
            details = m.details()
            assert details["hardware_breakpoints"].startswith("no: Z1 refused")
            assert details["watchpoints"].startswith("no: Z2 refused")
            assert details["monitor_reset"].startswith("no: qRcmd refused")
            assert details["memory_writes"] == "M (hex)"
            with pytest.raises(NotSupported, match="refuses watchpoints"):
                m.capability(Watchpoints)
            await m.capability(Breakpoints).set_breakpoint(0x200)
            assert b"Z0,200,2" in stub.received
            # nothing the probes inserted is left in
            inserted = [p for p in stub.received if p[:1] == b"Z"]
            removed = [p for p in stub.received if p[:1] == b"z"]
            assert len(inserted) == 5 and removed == []  # Z1, Z2, Z3, Z4 all refused; Z0 ours
        finally:
            await m.power_off()


async def test_no_target_description_is_refused_clearly() -> None:
    async with Stub(features=b"PacketSize=4000") as stub:
        m, _ = stub_machine(stub.port)
        with pytest.raises(BadImage, match="no target description"):
            await m.power_on()
        assert m.state is MachineState.OFF


async def test_a_target_of_another_arch_is_refused_naming_both() -> None:
    xml = b'<target><architecture>riscv:rv32</architecture><feature name="org.gnu.gdb.riscv.cpu">' \
          b'<reg name="pc" bitsize="32"/></feature></target>'
    async with small_target(xml=xml) as stub:
        m, _ = stub_machine(stub.port)
        with pytest.raises(BadImage, match=r"riscv:rv32.*arm-cortex-m"):
            await m.power_on()


async def test_garbage_and_a_hang_up_mid_call_fail_the_machine() -> None:
    for trouble in ({"garbage_on": b"m20000000"}, {"hang_up_on": b"m20000000"}):
        async with small_target(**trouble) as stub:
            m, events = stub_machine(stub.port)
            try:
                await m.power_on()
                with pytest.raises(BackendFailed):
                    await m.capability(MemoryAccess).read_memory(0x20000000, 4)
                assert m.state is MachineState.FAILED
                assert events.failures and "lost the remote target" in events.failures[0]
            finally:
                await m.power_off()


async def test_a_target_that_naks_everything() -> None:
    async with Stub(features=b"PacketSize=4000;qXfer:features:read+", nak_first=100) as stub:
        m, _ = stub_machine(stub.port)
        with pytest.raises(BackendFailed):
            await asyncio.wait_for(m.power_on(), 20)
        assert m.state is MachineState.OFF


async def test_resuming_from_a_breakpoint_steps_over_it(tmp_path: Path) -> None:
    """As gdb does: a continue or a step from a breakpoint of ours takes it out, steps,
    and puts it back, instead of stopping on it again at once."""
    async with remote(tmp_path, "hello") as (m, events, path, _):
        main = elf_address(path, "main")
        await m.capability(Breakpoints).set_breakpoint(main)
        await m.capability(RunControl).run()
        assert (await events.next_stop()).pc == main
        step = await m.capability(RunControl).step(1)
        assert step.reason is StopReason.STEP and step.pc != main
        # back at main (a register write), still a breakpoint there: continue runs past it
        await m.capability(RegisterAccess).write_register("pc", main)
        await m.capability(RunControl).run()
        stop = await events.next_stop()
        assert stop.reason is StopReason.EXIT and stop.exit_code == 0, stop


@contextlib.contextmanager
def qemu_with_pty(tmp_path: Path, program: str) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """A QEMU whose UART0 is a pseudo-terminal (``-serial pty``): the console endpoint a
    serial device on a real board would be."""
    binary = shutil.which("qemu-system-arm")
    if binary is None:
        pytest.skip("qemu-system-arm is not installed")
    gdb = str(tmp_path / "gdb.sock")
    proc = subprocess.Popen(
        [binary, "-M", BOARD, "-display", "none", "-monitor", "none", "-S",
         "-gdb", f"unix:{gdb},server=on,wait=off", "-serial", "pty",
         "-semihosting-config", "enable=on,target=native", "-kernel", str(firmware(BOARD, program))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # "char device redirected to /dev/pts/N (label serial0)"
        pty = line.split("redirected to ", 1)[1].split()[0] if "redirected to " in line else ""
        assert pty.startswith("/dev/"), line
        for _ in range(500):
            if Path(gdb).exists():
                break
            time.sleep(0.01)
        yield f"unix:{gdb}", f"serial:{pty}", proc
    finally:
        proc.kill()
        proc.wait(5)


async def test_a_serial_console_on_a_pty(tmp_path: Path) -> None:
    with qemu_with_pty(tmp_path, "echo") as (target, console, _):
        events = Recorder()
        m = GdbRemoteBackend().create_machine(
            board(BOARD), MachineOptions(extra={"gdbremote.target": target, "gdbremote.console": console}), events)
        try:
            await m.power_on()
            await m.load(elf_image(firmware(BOARD, "echo")))
            await m.capability(RunControl).run()
            await events.wait_console(b"echo ready\n")
            await m.capability(ConsoleInput).console_input(b"pty")
            await events.wait_console(b"pty")
            await m.capability(ConsoleInput).console_input(b"q")
            stop = await events.next_stop()
            assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0)
        finally:
            await m.power_off()

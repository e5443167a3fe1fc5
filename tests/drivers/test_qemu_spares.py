"""Warm spare QEMUs (drivers/qemu/spares.py), on real QEMUs: a board in demand gets one,
the next power-on takes it and the machine works as on a QEMU it started itself (its
console, exit, registers); only plain machines take one; an idle, dead or orphaned spare
is stopped and reaped; a cancelled start leaves no QEMU behind; through the server, the
spares live in the worker and end with it."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.config import ServerConfig
from machineserver.server.drivers.base import MachineOptions, MachineState, StopReason
from machineserver.server.drivers.qemu import QemuBackend, QemuMachine
from machineserver.server.drivers.qemu.launch import LaunchSpec
from machineserver.server.drivers.qemu.spares import SparePool
from machineserver.v1 import common_pb2 as cpb
from tests.drivers.qemu_helpers import Qm
from tests.helpers.api import console_text, until, upload, wait_state
from tests.helpers.backends import no_qemu_left_behind, qemu_children, reaped, require_backend
from tests.helpers.events import Recorder
from tests.helpers.firmware import firmware
from tests.helpers.machines import board, elf_image

BOARD = "mps2-an385"
CRC32_LINE = b"crc32=0x80f45f04\n"

Make = Callable[..., tuple[Qm, Recorder]]


@pytest.fixture
async def spare_backend() -> AsyncIterator[QemuBackend]:
    """A QEMU backend whose pool warms a board after 2 starts (so tests need few), every
    QEMU of it reaped by the end of the test."""
    require_backend("qemu", BOARD)
    with no_qemu_left_behind():
        backend = QemuBackend(spares=1)
        backend.spares = SparePool(per_spec=1, demand=2, window_s=60, idle_s=60)
        try:
            yield backend
        finally:
            await backend.aclose()


@pytest.fixture
async def make(spare_backend: QemuBackend) -> AsyncIterator[Make]:
    made: list[QemuMachine] = []

    def factory(board_name: str = BOARD, **extra: str) -> tuple[Qm, Recorder]:
        events = Recorder()
        icount = extra.pop("icount", "") == "1"
        m = spare_backend.create_machine(board(board_name), MachineOptions(icount=icount, extra=extra), events)
        assert isinstance(m, QemuMachine)
        made.append(m)
        return Qm(m), events

    try:
        yield factory
    finally:
        for m in made:
            await m.power_off()


def spec_of(m: Qm) -> LaunchSpec:
    return m.process.spec


async def warm(make: Make) -> tuple[SparePool, LaunchSpec, int]:
    """Two power cycles of the board: its spare is started; returns it once ready."""
    for _ in range(2):
        m, _ = make()
        await m.power_on()
        await m.power_off()
    pool = m.machine.target.process.spares
    assert pool is not None
    spec = spec_of(m)
    await until(lambda: pool.ready(spec), 20, what="a spare QEMU ready")
    [pid] = pool.process_ids()
    return pool, spec, pid


async def test_the_next_power_on_takes_the_spare_and_runs_like_any_qemu(make: Make) -> None:
    pool, spec, spare_pid = await warm(make)
    assert pool.stats.started == 1 and pool.stats.taken == 0

    m, ev = make()
    await m.power_on()
    assert m.qemu_pid == spare_pid and pool.stats.taken == 1
    # the program, its console output (this machine's events now) and its exit
    await m.load(elf_image(firmware(BOARD, "crc32")))
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0), stop
    await ev.wait_console(CRC32_LINE)
    assert m.state is MachineState.EXITED and m.qemu_pid == spare_pid  # caught at its trap
    regs = await m.regs.read_registers(["pc", "r0"])
    assert regs["pc"] == stop.pc and regs["r0"] in (0x18, 0x20)
    # reset keeps working on it (the program written again), and runs to the same end
    await m.reset()
    await m.run.run()
    assert (await ev.next_stop()).reason is StopReason.EXIT
    assert bytes(ev.console).count(CRC32_LINE) == 2

    # a replacement was started for the next machine, in a new process
    await until(lambda: pool.ready(spec), 20, what="the replacement spare")
    assert pool.process_ids() != [spare_pid] and pool.stats.started == 2
    # powering this machine off ends its QEMU, not the new spare
    await m.power_off()
    await until(lambda: reaped(spare_pid), 5, what="the taken spare's QEMU reaped")
    assert pool.ready(spec)


async def test_only_plain_machines_take_a_spare(make: Make) -> None:
    pool, spec, spare_pid = await warm(make)
    covered, _ = make(coverage="1")
    await covered.power_on()
    assert covered.qemu_pid != spare_pid  # its QEMU has a coverage table: its own
    counted, _ = make(icount="1")
    await counted.power_on()
    assert counted.qemu_pid != spare_pid and spec_of(counted) != spec  # another spec
    assert pool.stats.taken == 0 and pool.ready(spec) and pool.process_ids() == [spare_pid]
    # a snapshot restore starts its own QEMU too (from the stream), leaving the spare
    plain, _ = make()
    await plain.power_on()  # takes the spare
    assert plain.qemu_pid == spare_pid
    blob = await plain.snap.save_state()
    await plain.snap.restore_state(blob)
    assert plain.qemu_pid != spare_pid and pool.stats.taken == 1


async def test_a_board_started_once_gets_no_spare(make: Make) -> None:
    m, _ = make()
    await m.power_on()
    await asyncio.sleep(0.3)
    pool = m.machine.target.process.spares
    assert pool is not None and pool.stats.started == 0 and pool.process_ids() == []
    assert [p.pid for p in qemu_children()] == [m.qemu_pid]


async def test_an_idle_spare_is_stopped(make: Make, spare_backend: QemuBackend) -> None:
    spare_backend.spares.idle_s = 0.5
    pool, spec, spare_pid = await warm(make)
    await until(lambda: reaped(spare_pid), 10, what="the idle spare stopped and reaped")
    assert not pool.ready(spec) and pool.stats.expired == 1
    m, _ = make()
    await m.power_on()  # started on demand again
    assert m.qemu_pid != spare_pid and m.state is MachineState.HALTED


@pytest.mark.parametrize("how", ["killed", "killed-unnoticed", "frozen"])
async def test_a_dead_or_frozen_spare_is_not_handed_out(make: Make, how: str) -> None:
    """Killed and noticed by the pool; killed just before the power-on (not reaped yet);
    SIGSTOPped (alive, answering nothing): the power-on starts a QEMU of its own."""
    pool, spec, spare_pid = await warm(make)
    os.kill(spare_pid, signal.SIGSTOP if how == "frozen" else signal.SIGKILL)
    if how == "killed":
        await until(lambda: not pool.ready(spec) and pool.stats.expired == 1, 5,
                    what="the pool dropped its dead spare")
    m, ev = make()
    await m.power_on()
    assert m.qemu_pid != spare_pid and m.state is MachineState.HALTED and pool.stats.taken == 0
    await m.load(elf_image(firmware(BOARD, "crc32")))
    await m.run.run()
    assert (await ev.next_stop()).reason is StopReason.EXIT
    assert ev.failures == []
    await until(lambda: reaped(spare_pid), 5, what="the bad spare stopped and reaped")


async def test_a_cancelled_power_on_leaves_no_qemu(make: Make) -> None:
    """Cancelled while QEMU starts up (it is spawned, its connections not all made)."""
    m, _ = make()
    before = {p.pid for p in qemu_children()}
    task = asyncio.ensure_future(m.power_on())
    await until(lambda: {p.pid for p in qemu_children()} - before, 10, what="QEMU spawned")
    spawned = {p.pid for p in qemu_children()} - before
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for pid in spawned:
        await until(lambda pid=pid: reaped(pid), 5, what=f"QEMU {pid} of the cancelled start reaped")
    assert m.process.instance is None


def test_spares_end_with_their_event_loop() -> None:
    """A pool never closed (its owner forgot, or the process is ending): asyncio.run
    cancels the spare's keeper, which stops the QEMU and removes its directory."""
    require_backend("qemu", BOARD)
    seen: dict[str, object] = {}

    async def forgetful_owner() -> None:
        backend = QemuBackend(spares=1)
        backend.spares = SparePool(per_spec=1, demand=1, idle_s=60)
        m = backend.create_machine(board(BOARD), MachineOptions(), Recorder())
        assert isinstance(m, QemuMachine)
        await m.power_on()  # the first start already warms a spare (demand=1)
        spec = m.target.process.spec
        await until(lambda: backend.spares.ready(spec), 20, what="a spare ready")
        [seen["pid"]] = backend.spares.process_ids()
        seen["dir"] = backend.spares._ready[spec].launched.instance.dir
        await m.power_off()  # and no aclose

    with no_qemu_left_behind():
        thread = threading.Thread(target=asyncio.run, args=(forgetful_owner(),))
        thread.start()
        thread.join(60)
        assert not thread.is_alive()
    assert isinstance(seen["pid"], int) and isinstance(seen["dir"], str)
    assert reaped(seen["pid"]) and not os.path.exists(seen["dir"])


# --------------------------------------------------------------------------- through the server


@pytest.fixture
def qemus_reaped_at_the_end() -> Iterator[None]:
    """Set up before the server (so checked after it stopped): no QEMU outlives it."""
    require_backend("qemu", BOARD)
    with no_qemu_left_behind(settle_s=5.0):
        yield


@pytest.fixture
def server_config(server_config: ServerConfig) -> ServerConfig:
    """One worker process: every session of the board meets the same pool."""
    return replace(server_config, workers=1)


async def test_through_the_server_spares_live_in_the_worker_and_serve_sessions(
        qemus_reaped_at_the_end: None, client: AsyncClient) -> None:
    program = await upload(client, BOARD, "crc32")
    for _ in range(3):
        s = (await client.sessions.create_session(board_template=BOARD, program=program,
                                                   power_on=True, backend="qemu")).session
        await client.sessions.delete_session(name=s.name)
    # every session deleted: what is left is the board's spare, the worker's child
    await until(lambda: len(qemu_children()) == 1, 20, what="one spare QEMU left")
    assert qemu_children()[0].ppid() != os.getpid()
    # the next sessions run on a spare: a QEMU that was there before the session ends
    # with it (a session that came before the spare was ready starts its own: retried)
    for _attempt in range(5):
        await asyncio.sleep(0.5)
        before = {p.pid: p for p in qemu_children()}
        s = (await client.sessions.create_session(board_template=BOARD, program=program,
                                                   run=True, backend="qemu")).session
        await wait_state(client, s.name, cpb.SESSION_STATE_EXITED)
        assert await console_text(client, s.name) == CRC32_LINE
        await client.sessions.delete_session(name=s.name)
        await asyncio.sleep(0.5)
        if [pid for pid in before if reaped(pid)]:
            break
    else:
        raise AssertionError("no session ran on a spare QEMU in 5 attempts")
    # the server's stop ends the worker, and its spare with it (qemus_reaped_at_the_end)

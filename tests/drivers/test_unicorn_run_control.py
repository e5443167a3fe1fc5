"""Unicorn driver: the worker threads behind run control. Cancelled steps and pauses,
a worker stuck inside a peripheral model (the machine FAILS and keeps its engine),
engines freed at power-off, and the slice watchdog (never held up by a busy machine;
its threads joined)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from machineserver.server.drivers.base import BackendFailed, MachineState, StopReason, WrongState
from machineserver.server.drivers.unicorn import run_control, watchdog
from machineserver.server.drivers.unicorn.peripherals import Pl011
from tests.drivers.unicorn_helpers import start
from tests.helpers.firmware import elf_symbol


class StuckModel:
    """Makes the PL011 model block inside its register reads once armed: a worker thread
    stuck inside an MMIO access, as a buggy or deadlocked model would leave it."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = Pl011.read

        def read(model: Pl011, offset: int, size: int) -> int:
            if self.armed.is_set():
                self.entered.set()
                self.release.wait(60)
            return original(model, offset, size)

        monkeypatch.setattr(Pl011, "read", read)


@pytest.fixture
def stuck_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[StuckModel]:
    gate = StuckModel()
    gate.install(monkeypatch)
    yield gate
    gate.release.set()  # never leave a thread blocked behind the test


def engine_finalizer(m):
    """The live engine's own finalizer (internal): alive until the engine is freed."""
    return m._ctx.instance.uc._Uc__finalizer


def emulating_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("unicorn-") and t.name != "unicorn-watchdog"]


async def until(cond, what: str, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("board_name", ["lm3s6965evb", "sifive_e"])
async def test_cancelled_long_step_halts_and_joins_its_worker(board_name):
    m, p, rec = await start(board_name, "echo")  # polls the UART forever
    scratch = elf_symbol(board_name, "echo", "_ebss") + 0x100
    task = asyncio.create_task(p.run.step(10**9))
    await until(lambda: m.state == MachineState.RUNNING, "the step to start")  # on the worker
    assert len(p.footprint.host_thread_ids()) == 1
    # memory stays reachable: the step's slice yields at its next UART access
    await p.mem.write_memory(scratch, b"\x11\x22\x33\x44")
    assert await p.mem.read_memory(scratch, 4) == b"\x11\x22\x33\x44"
    await until(lambda: m.counters().instructions > 0, "the step to make progress")
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert m.state == MachineState.HALTED
    assert p.footprint.host_thread_ids() == [] and emulating_threads() == []
    assert rec.stops == [] and rec.failures == []
    done = m.counters()
    assert 0 < done.instructions < 10**9 and done.exact
    # usable: exact steps from where it stopped, then the program runs on
    stop = await p.run.step(5)
    assert stop.reason == StopReason.STEP and m.counters().instructions == done.instructions + 5
    await p.console.console_input(b"q")
    await p.run.run()
    assert (await rec.wait_stop()).exit_code == 0
    await m.power_off()


async def test_cancelled_pause_still_waits_for_the_worker(stuck_model):
    m, p, rec = await start("lm3s6965evb", "echo")
    await p.run.run()
    await rec.wait_console(b"echo ready\n")
    stuck_model.armed.set()
    assert await asyncio.to_thread(stuck_model.entered.wait, 20)
    pause = asyncio.create_task(p.run.pause())
    await asyncio.sleep(0.1)  # let the pause be requested
    pause.cancel()
    await asyncio.sleep(0.1)  # let the cancellation arrive
    assert not pause.done()  # the worker is inside the model: the pause waits for it
    assert m.state == MachineState.RUNNING
    stuck_model.release.set()
    with pytest.raises(asyncio.CancelledError):
        await pause
    assert m.state == MachineState.HALTED and emulating_threads() == []
    assert rec.stops == [] and rec.failures == []
    await p.console.console_input(b"q")
    await p.run.run()
    assert (await rec.wait_stop()).exit_code == 0
    await m.power_off()


async def test_stuck_worker_fails_the_machine_and_keeps_its_engine(stuck_model, monkeypatch):
    monkeypatch.setattr(run_control, "JOIN_TIMEOUT_S", 2.0)
    monkeypatch.setattr(run_control, "STUCK_RETRY_S", 0.05)
    m, p, rec = await start("lm3s6965evb", "echo")
    ram = elf_symbol("lm3s6965evb", "echo", "_ebss") + 0x100
    finalizer = engine_finalizer(m)
    await p.run.run()
    await rec.wait_console(b"echo ready\n")
    stuck_model.armed.set()
    assert await asyncio.to_thread(stuck_model.entered.wait, 20)

    with pytest.raises(BackendFailed, match="did not stop"):
        await p.run.pause()
    assert m.state == MachineState.FAILED
    assert len(rec.failures) == 1 and "did not stop" in rec.failures[0]
    # nothing waits for the lock the stuck worker may hold; nothing frees its engine
    with pytest.raises(WrongState):
        await p.mem.read_memory(ram, 4)
    with pytest.raises(WrongState):
        await p.run.run()
    with pytest.raises(BackendFailed):
        await m.reset()
    await m.power_off()  # never raises
    assert m.state == MachineState.FAILED and finalizer.alive
    assert len(rec.failures) == 1  # reported once

    # the watchdog is not held up by the stuck machine: another machine's slices end
    other, other_p, _ = await start("lm3s6965evb", "hello")
    await other_p.run.step(3)  # counted: no watchdog needed
    sibling, sibling_p, sibling_rec = await start("sifive_e", "echo")
    await sibling_p.run.run()
    await sibling_rec.wait_console(b"echo ready\n")
    assert (await sibling_p.run.pause()).reason == StopReason.HALT  # its slices still end
    await sibling.power_off()
    await other.power_off()

    stuck_model.release.set()  # the thread leaves the model and ends
    await until(lambda: emulating_threads() == [], "the stuck worker to end")
    await m.power_off()
    assert m.state == MachineState.OFF and not finalizer.alive
    assert rec.stops == []  # the abandoned worker's stop is nobody's
    assert len(rec.failures) == 1


async def test_power_off_frees_the_engine():
    m, p, rec = await start("mps2-an385", "hello")
    first = engine_finalizer(m)
    await p.run.run()
    await rec.wait_stop()
    await m.power_off()
    assert not first.alive
    await m.power_off()  # idempotent
    await m.power_on()
    second = engine_finalizer(m)
    assert second.alive
    await p.run.step(10)
    await m.power_off()
    assert not second.alive


def test_watchdog_retries_a_busy_machine_and_joins_its_threads(monkeypatch):
    monkeypatch.setattr(watchdog, "IDLE_EXIT_S", 0.05)
    dog = watchdog.SliceWatchdog()
    calls: list[int] = []
    done = threading.Event()

    class BusyTwice:
        def watchdog_stop(self, slice_id: int) -> bool:
            calls.append(slice_id)
            if len(calls) < 3:
                return False  # an MMIO access holds the machine: try again
            done.set()
            return True

    dog.arm(time.perf_counter(), BusyTwice(), 7)
    assert done.wait(10)
    assert calls == [7, 7, 7]
    first = dog._thread
    assert first is not None
    deadline = time.monotonic() + 10
    while dog.running:  # idle: the thread ends by itself
        assert time.monotonic() < deadline
        time.sleep(0.01)
    calls.clear()
    done.clear()
    dog.arm(time.perf_counter(), BusyTwice(), 8)  # a new thread; the ended one is joined
    assert done.wait(10) and calls == [8, 8, 8]
    assert not first.is_alive() and dog._retired is None and dog._thread is not first

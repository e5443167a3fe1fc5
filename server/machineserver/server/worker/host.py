"""The worker side: machines hosted in this process, driven by messages (see :mod:`.wire`).

:class:`WorkerHost` is the dispatch, independent of the transport: it creates machines
from the backends found by entry points, calls the lifecycle and the parts of the driver
interface by name (only the interface's own methods), and hands events and status to an
``emit`` callable. :func:`serve` puts it on one end of a socket pair (a worker process
the server started); a Ray actor can hold a WorkerHost the same way.

Every call runs as a task of its own, so a long step on one machine never holds up
another machine's calls; a ``cancel`` message cancels that task (the driver stops and
leaves the machine halted, as its contract says).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from machineserver.server.drivers import base as drv
from machineserver.server.drivers.discovery import discover_backends
from machineserver.server.lockstep.links import Traffic
from machineserver.server.lockstep.runner import Halt, Runner, RunState, Topology
from machineserver.server.worker import wire
from machineserver.server.worker.wire import Status, Traits

log = structlog.get_logger("machineserver.worker")

STATUS_INTERVAL = 0.05  # seconds between status pushes for running machines
PROGRESS_INTERVAL = 0.02  # seconds between a co-simulation segment's batches of console, traffic, progress
WORKER_NICE = 10  # workers run at this much lower a priority than the server

INTERFACES: dict[str, type[drv.Capability]] = {
    iface.__name__: iface
    for iface in (drv.RunControl, drv.RegisterAccess, drv.MemoryAccess, drv.Breakpoints, drv.Watchpoints,
                  drv.ConsoleInput, drv.Snapshots, drv.Coverage, drv.LockStep, drv.HostFootprint)
}
LIFECYCLE = frozenset({"power_on", "power_off", "reset", "load", "counters"})


def _callable_names(iface: type[drv.Capability]) -> frozenset[str]:
    return frozenset(n for n in dir(iface) if not n.startswith("_") and callable(getattr(iface, n, None))
                     and not isinstance(getattr(iface, n, None), property) and n != "feature")


METHODS = {name: _callable_names(iface) for name, iface in INTERFACES.items()}


class _Events:
    """MachineEvents of one hosted machine: any thread, never blocking."""

    def __init__(self, host: WorkerHost, mid: str) -> None:
        self._host = host
        self._mid = mid

    def console_output(self, data: bytes) -> None:
        self._host.event(self._mid, "console", bytes(data))

    def stopped(self, info: drv.StopInfo) -> None:
        self._host.event(self._mid, "stopped", info)

    def failed(self, reason: str) -> None:
        self._host.event(self._mid, "failed", reason)

    def reset_by_guest(self, detail: str) -> None:
        self._host.event(self._mid, "reset_by_guest", detail)


class WorkerHost:
    def __init__(self, backends: Mapping[str, drv.Backend], emit: Callable[[tuple[Any, ...]], None],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.backends = dict(backends)
        self._emit = emit
        self._loop = loop
        self.machines: dict[str, drv.Machine] = {}
        self._pushed: dict[str, Status] = {}
        self._runners: dict[str, Runner] = {}  # co-simulation segments running here, by first member
        self._loop_thread = threading.get_ident()  # made on the loop's thread

    # ------------------------------------------------------------------ from drivers

    def event(self, mid: str, kind: str, payload: object) -> None:
        """From any thread: the event goes out on the loop, with the machine's status."""
        if threading.get_ident() == self._loop_thread:
            self._send_event(mid, kind, payload)
        else:
            self._loop.call_soon_threadsafe(self._send_event, mid, kind, payload)

    def _send_event(self, mid: str, kind: str, payload: object) -> None:
        self._emit(("event", mid, kind, payload, self.status(mid)))

    # ------------------------------------------------------------------ calls

    def status(self, mid: str) -> Status | None:
        machine = self.machines.get(mid)
        if machine is None:
            return None
        status = self._status_of(machine)
        self._pushed[mid] = status
        return status

    @staticmethod
    def _status_of(machine: drv.Machine) -> Status:
        pids: tuple[int, ...] = ()
        tids: tuple[int, ...] = ()
        if machine.has(drv.HostFootprint):
            footprint = machine.capability(drv.HostFootprint)
            pids, tids = tuple(footprint.host_process_ids()), tuple(footprint.host_thread_ids())
        return machine.state, machine.counters(), pids, tids

    async def create(self, mid: str, backend_name: str, board: drv.BoardSpec, options: drv.MachineOptions) -> Traits:
        """Make a machine and power it on (one round trip for the server's power-on); a
        machine that does not power on is not kept."""
        backend = self.backends.get(backend_name)
        if backend is None:
            raise drv.NotSupported(f"this worker has no backend {backend_name!r}")
        machine = backend.create_machine(board, options, _Events(self, mid))
        self.machines[mid] = machine
        try:
            await machine.power_on()
        except BaseException:
            self.machines.pop(mid, None)
            with contextlib.suppress(Exception):
                await machine.power_off()
            raise
        return self.traits(machine)

    @staticmethod
    def traits(machine: drv.Machine) -> Traits:
        names = tuple(n for n, iface in INTERFACES.items() if machine.has(iface))
        registers: tuple[str, ...] = ()
        memory_while_running = False
        coverage_method, coverage_exact = "", False
        if machine.has(drv.RegisterAccess):
            registers = tuple(machine.capability(drv.RegisterAccess).register_names())
        if machine.has(drv.MemoryAccess):
            memory_while_running = machine.capability(drv.MemoryAccess).access_while_running
        if machine.has(drv.Coverage):
            coverage = machine.capability(drv.Coverage)
            with contextlib.suppress(drv.DriverError):
                coverage_method = coverage.method
            coverage_exact = coverage.exact_counts
        lacking = tuple((iface.__name__, why) for iface, why in machine.lacking().items())
        return Traits(names, registers, memory_while_running, coverage_method, coverage_exact, os.getpid(),
                      lacking, tuple(machine.details().items()))

    async def call(self, mid: str, interface: str, method: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any] | None = None) -> Any:
        machine = self.machines.get(mid)
        if machine is None:
            raise drv.WrongState(f"machine {mid} is not hosted by this worker", state="gone")
        if not interface:
            if method == "traits":
                return self.traits(machine)
            if method == "power_on":  # answers the traits (register names can depend on the target)
                await machine.power_on()
                return self.traits(machine)
            if method not in LIFECYCLE:
                raise drv.BadRequest(f"no lifecycle call {method!r}", field="method")
            target: object = machine
        else:
            iface = INTERFACES.get(interface)
            if iface is None or method not in METHODS[interface]:
                raise drv.BadRequest(f"no call {interface}.{method}", field="method")
            target = machine.capability(iface)
        result = getattr(target, method)(*args, **(kwargs or {}))
        if asyncio.iscoroutine(result):
            result = await result
        return result

    async def run_lockstep(self, mid: str, mids: list[str], topology: Topology, state: RunState, max_quanta: int,
                           until_ref: int, labels: list[str]) -> tuple[RunState, Halt | None]:
        """A co-simulation segment over machines all hosted here (the first is ``mid``):
        console bytes go out as each member's console events at the barrier they were
        written by; traffic and progress as lock-step events of the first, gathered and
        sent every ``PROGRESS_INTERVAL`` (a frame per barrier would wake the server at
        every quantum) and at the end, before the answer: the state after the segment and
        the halt, if any."""
        parts = []
        for m in mids:
            machine = self.machines.get(m)
            if machine is None:
                raise drv.WrongState(f"machine {m} is not hosted by this worker", state="gone")
            parts.append(machine.capability(drv.LockStep))
        console = [bytearray() for _ in mids]
        traffic: list[Traffic] = []
        sent = [time.monotonic()]
        barrier: list[tuple[int, int]] = []

        def flush() -> None:
            for m, data in zip(mids, console, strict=True):
                if data:
                    self.event(m, "console", bytes(data))
                    data.clear()
            if traffic:
                self.event(mid, "lockstep", ("traffic", list(traffic)))
                traffic.clear()
            if barrier:
                self.event(mid, "lockstep", ("barrier", *barrier[-1]))
                barrier.clear()
            sent[0] = time.monotonic()

        def on_console(i: int, data: bytes) -> None:
            console[i].extend(data)

        def on_barrier(time_ref: int, quanta: int) -> None:
            barrier[:] = [(time_ref, quanta)]
            # console output goes at its barrier (a console view interleaves members' lines
            # in the order they were written); the rest every PROGRESS_INTERVAL
            if any(console) or time.monotonic() - sent[0] >= PROGRESS_INTERVAL:
                flush()

        runner = Runner(topology, state, parts, labels, on_console, traffic.extend, on_barrier)
        self._runners[mid] = runner
        try:
            halt = await runner.run(max_quanta, until_ref)
        finally:
            self._runners.pop(mid, None)
            flush()
        return runner.state, halt

    def pause_lockstep(self, mid: str) -> None:
        runner = self._runners.get(mid)
        if runner is not None:
            runner.pause_requested = True

    async def drop(self, mid: str) -> None:
        machine = self.machines.pop(mid, None)
        self._pushed.pop(mid, None)
        if machine is not None:
            await machine.power_off()

    async def close(self) -> None:
        """Power every hosted machine off, then close the backends (e.g. QEMU's spares)."""
        for mid in list(self.machines):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.drop(mid), 10)
        for backend in self.backends.values():
            try:
                await asyncio.wait_for(backend.aclose(), 10)
            except Exception as exc:
                log.warning("driver_close_failed", driver=backend.name, error=str(exc))

    def changed_status(self) -> list[tuple[str, Status]]:
        """The machines whose state or counters moved since they were last sent."""
        out = []
        for mid, machine in self.machines.items():
            status = self._status_of(machine)
            if self._pushed.get(mid) != status:
                self._pushed[mid] = status
                out.append((mid, status))
        return out


# --------------------------------------------------------------------------- the process


def worker_main(sock: socket.socket, parent: int, enabled: list[str] | None) -> None:
    """A worker process's life (forked by the zygote): die with its parent, host machines
    until the server closes the socket."""
    from machineserver.server.worker.zygote import die_with_parent

    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # emulation is background work next to the control plane: a busy firmware must not
    # take the CPU from the server's event loop when it has a call to answer
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)
    backends = {backend.name: backend for backend in discover_backends(enabled)}
    asyncio.run(serve(sock, backends))


async def serve(sock: socket.socket, backends: Mapping[str, drv.Backend]) -> None:
    """Serve one server over ``sock`` until it closes its end."""
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()
    calls: dict[int, asyncio.Task[None]] = {}
    host: WorkerHost | None = None

    def on_message(message: tuple[Any, ...]) -> None:
        assert host is not None
        kind = message[0]
        if kind == "call":
            _, rid, mid, interface, method, args, kwargs = message
            start(rid, mid, functools.partial(host.call, mid, interface, method, args, kwargs))
        elif kind == "create":
            _, rid, mid, backend, board, options = message
            start(rid, mid, functools.partial(host.create, mid, backend, board, options))
        elif kind == "drop":
            _, rid, mid = message
            start(rid, mid, functools.partial(host.drop, mid))
        elif kind == "lockstep":
            _, rid, mid, mids, topology, state, max_quanta, until_ref, labels = message
            start(rid, mid, functools.partial(host.run_lockstep, mid, mids, topology, state, max_quanta,
                                              until_ref, labels))
        elif kind == "lockstep_pause":
            _, rid, mid = message
            start(rid, mid, functools.partial(host.pause_lockstep, mid))
        elif kind == "cancel":
            task = calls.get(message[1])
            if task is not None:
                task.cancel()

    protocol = wire.FrameProtocol(on_message, lambda reason: ended.set())

    def emit(message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):
            protocol.send(message)

    host = WorkerHost(backends, emit, loop)

    async def answer(rid: int, mid: str, work: Callable[[], Any]) -> None:
        assert host is not None
        try:
            result = work()
            if asyncio.iscoroutine(result):
                result = await result
            emit(("ok", rid, result, host.status(mid)))
        except BaseException as exc:  # every outcome is an answer; cancellation too
            emit(("err", rid, wire.encode_error(exc), host.status(mid)))
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise
        finally:
            calls.pop(rid, None)

    def start(rid: int, mid: str, work: Callable[[], Any]) -> None:
        calls[rid] = loop.create_task(answer(rid, mid, work), name=f"call-{rid}")

    async def push_status() -> None:
        assert host is not None
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            changed = host.changed_status()
            if changed:
                emit(("status", changed))

    transport, _ = await loop.create_unix_connection(lambda: protocol, sock=sock)
    pusher = loop.create_task(push_status())
    try:
        await ended.wait()
    finally:
        pusher.cancel()
        for task in list(calls.values()):
            task.cancel()
        await asyncio.gather(pusher, *calls.values(), return_exceptions=True)
        await host.close()
        transport.close()

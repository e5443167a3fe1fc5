"""A machine that lives in a worker process, seen through the driver interface.

:class:`RemoteMachine` is a :class:`~machineserver.server.drivers.base.Machine` like any
other: the core cannot tell it from an in-process one. Each of its parts forwards the
calls of one capability to the worker (one round trip over a local socket, ~60 µs);
the synchronous parts of the interface (state, counters, register names, the host
footprint) are answered from the status that comes back with every answer and event, and
that the worker pushes every 50 ms while the machine runs.

The machine is placed on a worker at power_on (least-loaded first) and leaves it at
power_off; the core makes a new machine for the next power_on.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from machineserver.server.drivers import base as drv
from machineserver.server.worker.wire import Status, Traits

if TYPE_CHECKING:
    from machineserver.server.worker.link import WorkerLink
    from machineserver.server.worker.pool import WorkerPool


class RemoteMachine(drv.Machine):
    capabilities = (drv.RunControl, drv.RegisterAccess, drv.MemoryAccess, drv.Breakpoints, drv.Watchpoints,
                    drv.ConsoleInput, drv.Snapshots, drv.Coverage, drv.LockStep, drv.HostFootprint)

    def __init__(self, pool: WorkerPool, backend: str, board: drv.BoardSpec, options: drv.MachineOptions,
                 events: drv.MachineEvents, provided: Sequence[type[drv.Capability]]) -> None:
        super().__init__()
        self.mid = uuid.uuid4().hex
        self.pool = pool
        self.backend = backend
        self.board = board
        self.options = options
        self.events = events
        self.link: WorkerLink | None = None
        self.traits: Traits | None = None
        self._state = drv.MachineState.OFF
        self._counters = drv.Counters(0, 0)
        # every register, read once after a stop and served from here until anything could
        # have changed one (any call but a read, any event, any status that moved): a halted
        # session's registers are answered without a round trip to a worker that may be busy
        self.registers: dict[str, int] | None = None
        self.footprint: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        # who hears this machine's lock-step events (a co-simulation segment running in its worker)
        self.on_lockstep: Callable[[Any], None] | None = None
        self.near: RemoteMachine | None = None  # power on in this machine's worker if it can
        parts: dict[type[drv.Capability], drv.Capability] = {
            drv.RunControl: RemoteRunControl(self), drv.RegisterAccess: RemoteRegisters(self),
            drv.MemoryAccess: RemoteMemory(self), drv.Breakpoints: RemoteBreakpoints(self),
            drv.Watchpoints: RemoteWatchpoints(self), drv.ConsoleInput: RemoteConsoleInput(self),
            drv.Snapshots: RemoteSnapshots(self), drv.Coverage: RemoteCoverage(self),
            drv.LockStep: RemoteLockStep(self), drv.HostFootprint: RemoteFootprint(self),
        }
        self.provide(*(parts[iface] for iface in provided if iface in parts))

    # ------------------------------------------------------------------ the worker's view

    @property
    def state(self) -> drv.MachineState:
        return self._state

    def counters(self) -> drv.Counters:
        return self._counters

    def details(self) -> Mapping[str, str]:
        return dict(self.traits.details) if self.traits is not None else {}

    async def current_counters(self) -> drv.Counters:
        if self.link is not None:
            await self.call("", "counters")  # the answer's status carries them
        return self._counters

    def on_status(self, status: Status) -> None:
        state, counters, pids, tids = status
        if (state, counters) != (self._state, self._counters):
            self.registers = None
        self._state, self._counters = state, counters
        self.footprint = (pids, tids)

    def on_event(self, kind: str, payload: Any, status: Status | None) -> None:
        if kind == "lockstep":
            if self.on_lockstep is not None:
                self.on_lockstep(payload)
            return
        if kind != "console":
            self.registers = None
        if status is not None:
            self.on_status(status)
        if kind == "console":
            self.events.console_output(payload)
        elif kind == "stopped":
            self.events.stopped(payload)
        elif kind == "failed":
            self.events.failed(payload)
        elif kind == "reset_by_guest":
            self.events.reset_by_guest(payload)

    def on_worker_death(self, reason: str) -> None:
        self.link = None
        if self._state is not drv.MachineState.OFF:
            self._state = drv.MachineState.FAILED
            self.events.failed(reason)

    async def call(self, interface: str, method: str, *args: Any, cancellable: bool = False, **kwargs: Any) -> Any:
        """One call in the worker; ``cancellable``: cancelling the caller cancels the call
        there too (a long step), otherwise a cancelled caller lets it finish."""
        link = self.link
        if link is None:
            if self._state is drv.MachineState.FAILED:
                raise drv.BackendFailed("the worker process of this machine is gone")
            raise drv.WrongState("the machine is off; power it on first", state="off", required="halted")
        if method not in READS:
            self.registers = None
        try:
            return await link.request("call", self, interface, method, args, kwargs, cancellable=cancellable)
        finally:
            if method not in READS:
                self.registers = None  # and whatever it did, afterwards too

    # ------------------------------------------------------------------ lifecycle

    async def power_on(self) -> None:
        """One round trip: the worker makes the machine (the first time), powers it on and
        answers its traits (register names can depend on the target)."""
        if self.link is None:
            link = await self.pool.place(self.near.link if self.near is not None else None)
            link.machines[self.mid] = self
            self.link = link
            try:
                self._take_traits(await link.request("create", self, self.backend, self.board, self.options))
            except BaseException:
                link.machines.pop(self.mid, None)
                self.link = None
                raise
        else:
            self._take_traits(await self.call("", "power_on"))

    def _take_traits(self, traits: Traits) -> None:
        self.traits = traits
        by_name = {iface.__name__: iface for iface in self.capabilities}
        for name, why in traits.lacking:
            if name in by_name:
                self.lack(by_name[name], why)
        if self.has(drv.MemoryAccess):
            self.capability(drv.MemoryAccess).access_while_running = traits.memory_while_running
        if self.has(drv.Coverage):
            self.capability(drv.Coverage).exact_counts = traits.coverage_exact

    async def power_off(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.machines.pop(self.mid, None)
            try:
                await link.request("drop", self)
            except drv.DriverError:
                pass  # the worker is gone: so is the machine
        self._state = drv.MachineState.OFF
        self.footprint = ((), ())

    async def reset(self) -> None:
        await self.call("", "reset")

    async def load(self, image: drv.ProgramImage) -> None:
        await self.call("", "load", image)


# calls that change nothing in the machine (the register cache survives them)
READS = frozenset({"read_registers", "read_memory", "coverage_blocks", "coverage_edges", "coverage_trace",
                   "counters", "traits", "save_state"})
HALTED_STATES = frozenset({drv.MachineState.HALTED, drv.MachineState.EXITED, drv.MachineState.FAULTED})


class _Part:
    def __init__(self, machine: RemoteMachine) -> None:
        self.machine = machine


class RemoteRunControl(_Part, drv.RunControl):
    async def run(self) -> None:
        await self.machine.call("RunControl", "run")

    async def pause(self) -> drv.StopInfo:
        info: drv.StopInfo = await self.machine.call("RunControl", "pause", cancellable=True)
        return info

    async def step(self, count: int = 1) -> drv.StopInfo:
        info: drv.StopInfo = await self.machine.call("RunControl", "step", count, cancellable=True)
        return info

    async def stop_reached(self) -> drv.StopInfo | None:
        info: drv.StopInfo | None = await self.machine.call("RunControl", "stop_reached")
        return info


class RemoteRegisters(_Part, drv.RegisterAccess):
    def register_names(self) -> Sequence[str]:
        traits = self.machine.traits
        return traits.register_names if traits is not None else ()

    async def read_registers(self, names: Sequence[str] | None = None) -> dict[str, int]:
        machine = self.machine
        if machine.state not in HALTED_STATES:
            values: dict[str, int] = await machine.call(
                "RegisterAccess", "read_registers", list(names) if names is not None else None)
            return values
        cached = machine.registers
        if cached is None:
            cached = await machine.call("RegisterAccess", "read_registers", None)
            machine.registers = cached
        assert cached is not None
        if names is None:
            return dict(cached)
        if all(n in cached for n in names):
            return {n: cached[n] for n in names}
        values = await machine.call("RegisterAccess", "read_registers", list(names))  # aliases
        return values

    async def write_register(self, name: str, value: int) -> None:
        await self.machine.call("RegisterAccess", "write_register", name, value)


class RemoteMemory(_Part, drv.MemoryAccess):
    async def read_memory(self, address: int, size: int) -> bytes:
        data: bytes = await self.machine.call("MemoryAccess", "read_memory", address, size)
        return data

    async def write_memory(self, address: int, data: bytes) -> None:
        await self.machine.call("MemoryAccess", "write_memory", address, bytes(data))


class RemoteBreakpoints(_Part, drv.Breakpoints):
    async def set_breakpoint(self, address: int, *, hardware: bool = False) -> None:
        await self.machine.call("Breakpoints", "set_breakpoint", address, hardware=hardware)

    async def clear_breakpoint(self, address: int) -> None:
        await self.machine.call("Breakpoints", "clear_breakpoint", address)


class RemoteWatchpoints(_Part, drv.Watchpoints):
    async def set_watchpoint(self, address: int, size: int, kind: drv.WatchKind) -> None:
        await self.machine.call("Watchpoints", "set_watchpoint", address, size, kind)

    async def clear_watchpoint(self, address: int, size: int, kind: drv.WatchKind) -> None:
        await self.machine.call("Watchpoints", "clear_watchpoint", address, size, kind)


class RemoteConsoleInput(_Part, drv.ConsoleInput):
    async def console_input(self, data: bytes) -> None:
        await self.machine.call("ConsoleInput", "console_input", bytes(data))


class RemoteSnapshots(_Part, drv.Snapshots):
    async def save_state(self) -> bytes:
        blob: bytes = await self.machine.call("Snapshots", "save_state")
        return blob

    async def restore_state(self, blob: bytes) -> None:
        await self.machine.call("Snapshots", "restore_state", bytes(blob))


class RemoteCoverage(_Part, drv.Coverage):
    @property
    def method(self) -> str:
        traits = self.machine.traits
        return traits.coverage_method if traits is not None else ""

    async def coverage_start(self) -> None:
        await self.machine.call("Coverage", "coverage_start")

    async def coverage_stop(self) -> None:
        await self.machine.call("Coverage", "coverage_stop")

    async def coverage_reset(self) -> None:
        await self.machine.call("Coverage", "coverage_reset")

    async def coverage_blocks(self) -> drv.Blocks:
        blocks: drv.Blocks = await self.machine.call("Coverage", "coverage_blocks")
        return blocks

    async def coverage_edges(self) -> drv.Edges | None:
        edges: drv.Edges | None = await self.machine.call("Coverage", "coverage_edges")
        return edges

    async def coverage_trace(self, count: int) -> list[int] | None:
        trace: list[int] | None = await self.machine.call("Coverage", "coverage_trace", int(count))
        return trace


class RemoteLockStep(_Part, drv.LockStep):
    async def begin(self, watch: Sequence[tuple[int, int]]) -> int:
        cycles: int = await self.machine.call("LockStep", "begin", tuple(watch))
        return cycles

    async def end(self) -> None:
        await self.machine.call("LockStep", "end")

    async def advance(self, until_cycles: int, inputs: drv.BarrierInput) -> drv.QuantumResult:
        result: drv.QuantumResult = await self.machine.call(
            "LockStep", "advance", until_cycles, inputs, cancellable=True)
        return result

    async def checkpoint(self) -> None:
        await self.machine.call("LockStep", "checkpoint")

    async def rollback(self) -> None:
        await self.machine.call("LockStep", "rollback")


class RemoteFootprint(_Part, drv.HostFootprint):
    def host_process_ids(self) -> Sequence[int]:
        return self.machine.footprint[0]

    def host_thread_ids(self) -> Sequence[int]:
        return self.machine.footprint[1]

    def host_thread_process(self) -> int:
        traits = self.machine.traits
        return traits.worker_pid if traits is not None else 0

"""Run control of a gdbremote machine: ``c`` to run (a watcher task takes the stop
reply), ^C to pause, ``s`` repeated to step, and what a stop reply means.

Stop replies: ``T``/``S`` with SIGTRAP at a breakpoint of ours is BREAKPOINT, with a
``watch``/``rwatch``/``awatch`` field WATCHPOINT, after ``s`` STEP; SIGINT is HALT; any
other signal (SIGSEGV, SIGBUS, SIGILL...) is FAULT naming it. ``W xx``: the program
exited with code xx (EXITED). ``X xx``: the remote's process was killed: FAILED with the
reason. A connection that drops: FAILED (see :mod:`.link`).

Watchpoints are reported as gdb does for "non-steppable" ones (QEMU reports the stop
before the access): the accessing instruction is stepped with the watchpoints out, they
go back in, and the stop reads like a data breakpoint, after the access, with the value.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from machineserver.server.drivers.base import (
    BadRequest,
    MachineState,
    RunControl,
    StopInfo,
    StopReason,
)
from machineserver.server.drivers.gdbremote.link import (
    HARDWARE,
    REQUEST_TIMEOUT,
    SOFTWARE,
    WATCH_TYPE,
    RemoteLink,
    guarded,
    insert_breakpoint,
    refusals_ignored,
)
from machineserver.server.rsp import RspError, State, StopReply

SIGINT, SIGTRAP = 2, 5


class RemoteRunControl(RunControl):
    """``step(count)`` runs ``count`` single steps (``s``), one round trip each, checking
    for cancellation between them: a remote target offers no counted run, so a large
    count is slow (~0.3 ms a step against a local QEMU, milliseconds through a probe on
    a real board)."""

    def __init__(self, link: RemoteLink) -> None:
        self.link = link
        self._watcher: asyncio.Task[None] | None = None
        self._claim: asyncio.Future[StopReply] | None = None

    # ------------------------------------------------------------------ running

    @guarded
    async def run(self) -> None:
        async with self.link.op:
            self.link.require(MachineState.HALTED, action="run")
            _, stop = await self._step_off_breakpoint()
            if stop is not None and stop.reason is not StopReason.STEP:
                self.link.events.stopped(stop)  # the instruction stepped over stopped it (a watchpoint, an exit)
                return
            await self._resume()

    async def _step_off_breakpoint(self) -> tuple[bool, StopInfo | None]:
        """Resuming from a breakpoint of ours (as gdb does): take it out, step once, put it
        back, so the target does not stop at once on the breakpoint it stopped at. Returns
        whether it stepped, and the stop that step ended with (STEP, or what it met: a
        watchpoint, an exit, a fault)."""
        link = self.link
        pc = await link.read_pc()
        hardware = link.points.breakpoints.get(pc)
        if hardware is None:
            return False, None
        stub = link.stub()
        with refusals_ignored():
            await stub.remove_point(HARDWARE if hardware else SOFTWARE, pc, link.breakpoint_kind(pc, None))
        try:
            reply = await self._one_step()
        finally:
            if stub.state is State.IDLE:
                link.points.breakpoints[pc] = await insert_breakpoint(link, stub, pc, hardware)
        info = await self.decode(reply, StopReason.STEP)
        if info is None:
            raise link.fail(link.failure)
        return True, info

    async def _resume(self) -> None:
        await self.link.stub().send_continue(b"c", timeout=REQUEST_TIMEOUT)
        self.link.state = MachineState.RUNNING
        self._watcher = asyncio.create_task(self._watch(), name="gdbremote-stop-watcher")

    async def _watch(self) -> None:
        link = self.link
        client = link.client
        assert client is not None
        try:
            reply = await client.wait_stop()
        except RspError as exc:
            link.unusable(exc)
            if self._claim is not None and not self._claim.done():
                self._claim.set_exception(link.fail(str(exc)))
            return
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.set_result(reply)  # a pause or an edit takes it
            return
        try:
            async with link.op:
                info = await self.decode(reply, StopReason.BREAKPOINT)
        except RspError as exc:
            link.unusable(exc)
            return
        if info is not None:
            link.events.stopped(info)

    async def _take_stop(self) -> StopReply:
        """Interrupt the running target and take its stop reply from the watcher."""
        loop = asyncio.get_running_loop()
        self._claim = claim = loop.create_future()
        self.link.stub().interrupt()
        return await asyncio.wait_for(claim, REQUEST_TIMEOUT)

    @guarded
    async def pause(self) -> StopInfo:
        if self.link.state is MachineState.RUNNING and self._watcher is not None and not self._watcher.done():
            reply = await self._take_stop()
            async with self.link.op:
                info = await self.decode(reply, StopReason.HALT)
            if info is None:
                raise self.link.fail(self.link.failure)
            return info
        if self._watcher is not None:
            await asyncio.wait({self._watcher})  # a stop being reported: let it finish
        async with self.link.op:
            self.link.require(MachineState.HALTED, MachineState.EXITED, MachineState.FAULTED,
                              action="pause")
            if self.link.state is MachineState.HALTED:
                return StopInfo(StopReason.HALT, pc=await self.link.read_pc())
            return StopInfo(StopReason.HALT, pc=self.link.last_pc)

    @contextlib.asynccontextmanager
    async def halted_for_edit(self) -> AsyncIterator[None]:
        """Breakpoints and watchpoints change only while the target is stopped (all-stop
        RSP): a running target is interrupted quietly and resumed after the edit (a stop
        that came first instead is reported as usual)."""
        if self.link.state is not MachineState.RUNNING:
            yield
            return
        reply = await self._take_stop()
        if reply.kind in ("S", "T") and reply.signal == SIGINT and reply.watch is None:
            self.link.state = MachineState.HALTED
            yield
            await self._resume()
            return
        info = await self.decode(reply, StopReason.BREAKPOINT)
        yield
        if info is not None:
            self.link.events.stopped(info)

    # ------------------------------------------------------------------ stepping

    @guarded
    async def step(self, count: int = 1) -> StopInfo:
        if count < 1:
            raise BadRequest("count must be at least 1", field="count")
        async with self.link.op:
            self.link.require(MachineState.HALTED, action="step")
            stepped, first = await self._step_off_breakpoint()  # the first step, over a breakpoint of ours
            if first is not None and (first.reason is not StopReason.STEP or count == 1):
                return first
            for done in range(2 if stepped else 1, count + 1):
                reply = await self._one_step()
                last = done == count
                info = await self.decode(reply, StopReason.STEP)
                if info is None:
                    raise self.link.fail(self.link.failure)
                if info.reason is not StopReason.STEP:
                    return info
                if not last and info.pc in self.link.points.breakpoints:
                    return StopInfo(StopReason.BREAKPOINT, pc=info.pc)
                if last:
                    return info
        raise AssertionError("unreachable")

    async def _one_step(self) -> StopReply:
        """``s``; when the caller is cancelled while the step is owed, its reply is taken
        (interrupting if need be) so the machine is left HALTED and usable."""
        client = self.link.stub()
        try:
            reply = await client.step(timeout=REQUEST_TIMEOUT)
        except asyncio.CancelledError:
            if client.state is State.RUNNING:
                with contextlib.suppress(RspError, TimeoutError):
                    await asyncio.shield(self._drain_step())
            raise
        self.link.steps += 1
        return reply

    async def _drain_step(self) -> None:
        client = self.link.stub()
        try:
            await client.wait_stop(timeout=0.5)
        except TimeoutError:
            client.interrupt()
            await client.wait_stop(timeout=REQUEST_TIMEOUT)

    # ------------------------------------------------------------------ stops

    async def decode(self, reply: StopReply, default: StopReason) -> StopInfo | None:
        """The StopInfo for a stop reply (the machine's state set from it); None when it
        made the machine FAILED (``X``). The caller holds ``op``."""
        link = self.link
        if reply.kind == "W":
            link.state = MachineState.EXITED
            return StopInfo(StopReason.EXIT, pc=link.last_pc, exit_code=reply.signal)
        if reply.kind == "X":
            link.fail(f"the remote target's process was killed (signal {reply.signal})")
            return None
        if reply.watch is not None:
            return await self._watch_stop(reply)
        pc = await link.read_pc()
        if reply.signal == SIGINT:
            link.state = MachineState.HALTED
            return StopInfo(StopReason.HALT, pc=pc)
        if reply.signal != SIGTRAP:
            link.state = MachineState.FAULTED
            return StopInfo(StopReason.FAULT, pc=pc, message=f"the target stopped with signal {reply.signal}")
        link.state = MachineState.HALTED
        if default is not StopReason.STEP and (pc in link.points.breakpoints or reply.breakpoint):
            return StopInfo(StopReason.BREAKPOINT, pc=pc)
        return StopInfo(default, pc=pc)

    async def _watch_stop(self, reply: StopReply) -> StopInfo | None:
        link = self.link
        client = link.stub()
        assert reply.watch is not None
        access, address = reply.watch
        for addr, size, kind in link.points.watchpoints:
            with refusals_ignored():
                await client.remove_point(WATCH_TYPE[kind], addr, size)
        after = await client.step(timeout=REQUEST_TIMEOUT)
        link.steps += 1
        for addr, size, kind in link.points.watchpoints:
            await client.insert_point(WATCH_TYPE[kind], addr, size)
        if after.exited:
            return await self.decode(after, StopReason.STEP)
        pc = await link.read_pc()
        value = None
        with refusals_ignored():
            data = await client.read_memory(address, min(link.points.watch_size(address), 8))
            value = int.from_bytes(data, "little")
        link.state = MachineState.HALTED
        return StopInfo(StopReason.WATCHPOINT, pc=pc, watch_address=address, watch_value=value,
                        watch_access=access)

    async def stop_watching(self) -> None:
        """Power-off: the watcher ends with the connection."""
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        self._watcher = None
        self._claim = None

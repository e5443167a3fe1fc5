"""DebugService, including the bidirectional Attach stream (which answers each command
through the same methods as the unary RPCs)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message
from grpc import aio

from machineserver.server.api import convert
from machineserver.server.api.base import Servicer
from machineserver.server.api.errors import code_for
from machineserver.server.api.waits import OUTCOME_TO_PB, budget_from_pb
from machineserver.server.core.calls import CURRENT, CallInfo, Transport, new_request_id
from machineserver.server.core.debug import StepMode
from machineserver.server.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    MachineServerError,
)
from machineserver.server.core.sessions import LiveSession
from machineserver.server.core.waits import Waits
from machineserver.server.drivers.base import StopInfo
from machineserver.v1 import common_pb2 as common_pb
from machineserver.v1 import debug_pb2 as pb
from machineserver.v1 import debug_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

# Commands an observer may send.
READ_ONLY_COMMANDS = frozenset({"read_registers", "read_memory", "resolve_symbol", "take_control", "backtrace",
                                "disassemble"})
# a waiting call halts the session this long before its deadline, so the answer (the
# DEADLINE_EXCEEDED that says it was halted) reaches the caller in time
DEADLINE_MARGIN_SECONDS = 0.2
# each Attach command is a call named after the unary RPC it mirrors
ATTACH_METHODS = {
    field.name: "/machineserver.v1.DebugService/" + ("Attach" if field.name == "take_control" else
                                                     "".join(w.capitalize() for w in field.name.split("_")))
    for field in pb.DebugCommand.DESCRIPTOR.oneofs_by_name["command"].fields
}
STEP_MODES = {
    pb.STEP_MODE_UNSPECIFIED: StepMode.OVER,
    pb.STEP_MODE_INTO: StepMode.INTO,
    pb.STEP_MODE_OVER: StepMode.OVER,
    pb.STEP_MODE_OUT: StepMode.OUT,
}


_CLEANUPS: set[asyncio.Future[None]] = set()


class DebugServicer(Servicer, pb_grpc.DebugServiceServicer):
    def _stop(self, live: LiveSession, stop: StopInfo | None) -> common_pb.StopEvent:
        return convert.stop_pb(stop, self.engine.debugger.position(live, stop.pc) if stop else None)

    def _state(self, live: LiveSession) -> common_pb.SessionState.ValueType:
        return convert.STATE_TO_PB[live.state]

    # ------------------------------------------------------------------ breakpoints

    async def SetBreakpoint(
        self,
        request: pb.SetBreakpointRequest,
        context: aio.ServicerContext[pb.SetBreakpointRequest, pb.SetBreakpointResponse] | None,
        client: str = "",
    ) -> pb.SetBreakpointResponse:
        live = self.engine.sessions.get(request.name)
        kind = convert.enum_value(convert.KIND_FROM_PB, request.kind, "kind")
        loc = convert.location_from_pb(request.location)
        bp = await self.engine.debugger.set_breakpoint(live, loc, kind, request.size, client)
        return pb.SetBreakpointResponse(breakpoint=convert.breakpoint_pb(bp))

    async def ListBreakpoints(
        self,
        request: pb.ListBreakpointsRequest,
        context: aio.ServicerContext[pb.ListBreakpointsRequest, pb.ListBreakpointsResponse],
    ) -> pb.ListBreakpointsResponse:
        live = self.engine.sessions.get(request.name)
        return pb.ListBreakpointsResponse(
            breakpoints=[convert.breakpoint_pb(b) for b in self.engine.debugger.list_breakpoints(live)]
        )

    async def ClearBreakpoint(
        self,
        request: pb.ClearBreakpointRequest,
        context: aio.ServicerContext[pb.ClearBreakpointRequest, pb.ClearBreakpointResponse] | None,
    ) -> pb.ClearBreakpointResponse:
        live = self.engine.sessions.get(request.name)
        await self.engine.debugger.clear_breakpoint(live, request.id)
        return pb.ClearBreakpointResponse()

    # ------------------------------------------------------------------ registers and memory

    async def ReadRegisters(
        self,
        request: pb.ReadRegistersRequest,
        context: aio.ServicerContext[pb.ReadRegistersRequest, pb.ReadRegistersResponse] | None,
    ) -> pb.ReadRegistersResponse:
        live = self.engine.sessions.get(request.name)
        regs = await self.engine.debugger.read_registers(live, list(request.names))
        return pb.ReadRegistersResponse(
            registers=[common_pb.Register(name=n, value=v, size_bits=32) for n, v in regs.items()]
        )

    async def WriteRegister(
        self,
        request: pb.WriteRegisterRequest,
        context: aio.ServicerContext[pb.WriteRegisterRequest, pb.WriteRegisterResponse] | None,
    ) -> pb.WriteRegisterResponse:
        live = self.engine.sessions.get(request.name)
        value = await self.engine.debugger.write_register(live, request.register, request.value)
        return pb.WriteRegisterResponse(register=common_pb.Register(name=request.register, value=value, size_bits=32))

    async def ReadMemory(
        self,
        request: pb.ReadMemoryRequest,
        context: aio.ServicerContext[pb.ReadMemoryRequest, pb.ReadMemoryResponse] | None,
    ) -> pb.ReadMemoryResponse:
        live = self.engine.sessions.get(request.name)
        data = await self.engine.debugger.read_memory(live, request.address, request.size)
        return pb.ReadMemoryResponse(address=request.address, data=data)

    async def WriteMemory(
        self,
        request: pb.WriteMemoryRequest,
        context: aio.ServicerContext[pb.WriteMemoryRequest, pb.WriteMemoryResponse] | None,
    ) -> pb.WriteMemoryResponse:
        live = self.engine.sessions.get(request.name)
        n = await self.engine.debugger.write_memory(live, request.address, request.data)
        return pb.WriteMemoryResponse(bytes_written=n)

    # ------------------------------------------------------------------ run control

    async def Step(
        self,
        request: pb.StepRequest,
        context: aio.ServicerContext[pb.StepRequest, pb.StepResponse] | None,
    ) -> pb.StepResponse:
        live = self.engine.sessions.get(request.name)
        stop = await self.engine.sessions.step(live, request.count, _time_left(context))
        return pb.StepResponse(stop=self._stop(live, stop), state=self._state(live))

    async def Continue(
        self,
        request: pb.ContinueRequest,
        context: aio.ServicerContext[pb.ContinueRequest, pb.ContinueResponse],
    ) -> pb.ContinueResponse:
        live = self.engine.sessions.get(request.name)
        if not request.wait:
            if request.HasField("budget"):
                raise InvalidArgument("budget", "a budget needs wait: a continue that does not wait counts nothing")
            await self.engine.sessions.run(live)
            return pb.ContinueResponse(state=self._state(live))
        if request.HasField("budget"):
            budget = budget_from_pb(request.budget)
            result = await Waits(self.engine.sessions).continue_(live, budget, _time_left(context))
            return pb.ContinueResponse(stop=self._stop(live, result.stop), state=self._state(live),
                                       outcome=OUTCOME_TO_PB[result.outcome])
        stop = await self.engine.sessions.ops.run_until_stop(live, _time_left(context))
        return pb.ContinueResponse(stop=self._stop(live, stop), state=self._state(live))

    async def Halt(
        self,
        request: pb.HaltRequest,
        context: aio.ServicerContext[pb.HaltRequest, pb.HaltResponse] | None,
    ) -> pb.HaltResponse:
        live = self.engine.sessions.get(request.name)
        stop = await self.engine.sessions.pause(live, "halted")
        return pb.HaltResponse(stop=self._stop(live, stop), state=self._state(live))

    # ------------------------------------------------------------------ code and symbols

    async def Disassemble(
        self,
        request: pb.DisassembleRequest,
        context: aio.ServicerContext[pb.DisassembleRequest, pb.DisassembleResponse] | None,
    ) -> pb.DisassembleResponse:
        live = self.engine.sessions.get(request.name)
        loc = convert.location_from_pb(request.location) if request.HasField("location") else None
        insns = await self.engine.debugger.disassemble(live, loc, request.count)
        return pb.DisassembleResponse(instructions=[
            pb.Instruction(address=i.address, bytes=i.raw, mnemonic=i.mnemonic, operands=i.operands,
                           symbol=i.symbol, source=convert.source_pb(i.source))
            for i in insns
        ])

    async def ResolveSymbol(
        self,
        request: pb.ResolveSymbolRequest,
        context: aio.ServicerContext[pb.ResolveSymbolRequest, pb.ResolveSymbolResponse] | None,
    ) -> pb.ResolveSymbolResponse:
        live = self.engine.sessions.get(request.name)
        which = request.WhichOneof("query")
        if which is None:
            raise InvalidArgument("query", "give a symbol, an address or file_line")
        name, address, size, offset, pos = self.engine.debugger.resolve_query(
            live,
            symbol=request.symbol if which == "symbol" else "",
            address=request.address if which == "address" else None,
            file_line=request.file_line if which == "file_line" else "",
        )
        return pb.ResolveSymbolResponse(symbol=name, address=address, size=size, offset=offset,
                                        source=convert.source_pb(pos))

    # ------------------------------------------------------------------ GDB bridge

    async def StartGdbServer(
        self,
        request: pb.StartGdbServerRequest,
        context: aio.ServicerContext[pb.StartGdbServerRequest, pb.StartGdbServerResponse],
    ) -> pb.StartGdbServerResponse:
        live = self.engine.sessions.get(request.name)
        ep = await self.engine.gdb.start(live, request.bind_address, request.port, request.halt_on_detach)
        return pb.StartGdbServerResponse(gdb_server=pb.GdbServer(
            session=ep.session, address=ep.address, port=ep.port, clients=ep.clients,
            halt_on_detach=ep.halt_on_detach))

    async def StopGdbServer(
        self,
        request: pb.StopGdbServerRequest,
        context: aio.ServicerContext[pb.StopGdbServerRequest, pb.StopGdbServerResponse],
    ) -> pb.StopGdbServerResponse:
        await self.engine.gdb.stop(self.engine.sessions.get(request.name))
        return pb.StopGdbServerResponse()

    # ------------------------------------------------------------------ source level

    async def StepLine(
        self,
        request: pb.StepLineRequest,
        context: aio.ServicerContext[pb.StepLineRequest, pb.StepLineResponse] | None,
    ) -> pb.StepLineResponse:
        live = self.engine.sessions.get(request.name)
        mode = convert.enum_value(STEP_MODES, request.mode, "mode")
        stop = await self.engine.stepper.step_line(live, mode, _time_left(context))
        return pb.StepLineResponse(stop=self._stop(live, stop), state=self._state(live))

    async def Backtrace(
        self,
        request: pb.BacktraceRequest,
        context: aio.ServicerContext[pb.BacktraceRequest, pb.BacktraceResponse] | None,
    ) -> pb.BacktraceResponse:
        live = self.engine.sessions.get(request.name)
        frames = await self.engine.stepper.backtrace(live, request.max_frames)
        return pb.BacktraceResponse(frames=[
            pb.Frame(level=f.level, pc=f.pc, cfa=f.cfa, location=convert.source_pb(f.source)) for f in frames
        ])

    # ------------------------------------------------------------------ Attach

    async def Attach(
        self,
        request_iterator: AsyncIterator[pb.AttachRequest],
        context: aio.ServicerContext[pb.AttachRequest, pb.AttachResponse],
    ) -> AsyncIterator[pb.AttachResponse]:
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("request") != "open":
            raise InvalidArgument("open", "the first message of Attach must be an open")
        opened = first.open
        live = self.engine.sessions.get(opened.name, "open.name")
        debugger = self.engine.debugger
        stream = CURRENT.get()
        client = "attach-" + secrets.token_hex(4)
        if opened.control:
            debugger.take_control(live, client)
        out: asyncio.Queue[pb.AttachResponse | None] = asyncio.Queue(maxsize=1024)
        failures: list[BaseException] = []

        def role() -> pb.AttachRole.ValueType:
            return pb.ATTACH_ROLE_CONTROLLER if debugger.state(live).controller == client else pb.ATTACH_ROLE_OBSERVER

        await out.put(pb.AttachResponse(opened=pb.AttachOpened(session=live.record.name, role=role(), state=self._state(live))))

        async def pump_events() -> None:
            sub = self.engine.sessions.events.subscribe(lambda ev: ev.session == live.id)
            async for ev in sub:
                if ev.stop is not None:
                    await out.put(pb.AttachResponse(stopped=self._stop(live, ev.stop)))
                await out.put(pb.AttachResponse(state=convert.STATE_TO_PB[ev.state]))

        async def pump_console() -> None:
            async for chunk in live.console.follow(live.console.end, follow=True):
                await out.put(pb.AttachResponse(console=chunk.data))

        async def read_commands() -> None:
            async for req in requests:
                if req.WhichOneof("request") != "command":
                    await out.put(_result(0, InvalidArgument("command", "open may only come first")))
                    continue
                await out.put(await self._run_command(live, client, req.command, role, stream))

        async def owned(part: Callable[[], Awaitable[None]]) -> None:
            """A part of the stream: when it ends (the client closed its side) or fails,
            the stream ends; a failure ends it with INTERNAL, not OK."""
            try:
                await part()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("attach_stream_failed", session_id=live.id, part=part.__name__)
                failures.append(exc)
            finally:
                await out.put(None)

        tasks = [asyncio.create_task(owned(f)) for f in (pump_events, pump_console, read_commands)]
        cleanups: list[asyncio.Future[None]] = []

        def detach(_: aio.ServicerContext[pb.AttachRequest, pb.AttachResponse] | None = None) -> None:
            """Ends the stream's parts and frees control, at once and without awaiting.
            Also the RPC's done callback: a client that vanishes while this generator is
            suspended at a ``yield`` gets it cancelled outside the generator, whose
            ``finally`` then waits for the garbage collector (seen: control held over 30 s)."""
            for t in tasks:
                t.cancel()
            if debugger.state(live).controller == client:
                debugger.release_control(live, client)
                if opened.clear_breakpoints_on_detach and self.engine.sessions.contains(live):
                    cleanups.append(cleanup := asyncio.ensure_future(self._clear_breakpoints(live, client)))
                    _CLEANUPS.add(cleanup)  # a strong reference: the stream may be gone first
                    cleanup.add_done_callback(_CLEANUPS.discard)

        context.add_done_callback(detach)  # type: ignore[arg-type]  # grpc-stubs types the callback as a class
        try:
            while (item := await out.get()) is not None:
                yield item
            if failures:
                raise failures[0]
        finally:
            detach()
            await asyncio.gather(*tasks, *cleanups, return_exceptions=True)

    async def _clear_breakpoints(self, live: LiveSession, client: str) -> None:
        with contextlib.suppress(MachineServerError):
            await self.engine.debugger.clear_client_breakpoints(live, client)

    async def _run_command(self, live: LiveSession, client: str, cmd: pb.DebugCommand,
                           role: Callable[[], pb.AttachRole.ValueType], stream: CallInfo | None) -> pb.AttachResponse:
        which = cmd.WhichOneof("command")
        if which is None:
            return _result(cmd.tag, InvalidArgument("command", "empty command"))
        calls = self.engine.calls
        call = calls.open(ATTACH_METHODS[which], stream.metadata if stream else {}, transport=Transport.ATTACH,
                          peer=stream.peer if stream else "",
                          request_id=f"{stream.request_id if stream else new_request_id()}.{cmd.tag}")
        try:
            response = await calls.run(call, lambda: self._command(live, client, cmd, which, role))
            response.result.request_id = call.request_id
            return response
        except MachineServerError as exc:
            return _result(cmd.tag, exc, call.request_id)
        except Exception:
            # logged and answered on this command; the stream goes on
            log.exception("attach_command_crashed", session_id=live.id, command=which, request_id=call.request_id)
            return _internal(cmd.tag, call.request_id)

    async def _command(self, live: LiveSession, client: str, cmd: pb.DebugCommand, which: str,
                       role: Callable[[], pb.AttachRole.ValueType]) -> pb.AttachResponse:
        if which == "take_control":
            self.engine.debugger.take_control(live, client)
            return pb.AttachResponse(result=pb.DebugCommandResult(tag=cmd.tag, role=role()))
        if which not in READ_ONLY_COMMANDS and role() != pb.ATTACH_ROLE_CONTROLLER:
            raise FailedPrecondition(
                f"this Attach stream observes session {live.id}; another client has control",
                required="controller",
            )
        request = getattr(cmd, which)
        request.name = request.name or live.record.name
        # the unary RPCs' own methods, with no context (None): a command has no deadline of its own
        handlers: dict[str, Callable[[Any], Awaitable[Message]]] = {
            "set_breakpoint": lambda r: self.SetBreakpoint(r, None, client),
            "clear_breakpoint": lambda r: self.ClearBreakpoint(r, None),
            "step": lambda r: self.Step(r, None),
            "continue": lambda r: self._continue_nowait(r),
            "halt": lambda r: self.Halt(r, None),
            "read_registers": lambda r: self.ReadRegisters(r, None),
            "write_register": lambda r: self.WriteRegister(r, None),
            "read_memory": lambda r: self.ReadMemory(r, None),
            "write_memory": lambda r: self.WriteMemory(r, None),
            "resolve_symbol": lambda r: self.ResolveSymbol(r, None),
            "step_line": lambda r: self.StepLine(r, None),
            "backtrace": lambda r: self.Backtrace(r, None),
            "disassemble": lambda r: self.Disassemble(r, None),
        }
        response = await handlers[which](request)
        result = pb.DebugCommandResult(tag=cmd.tag)
        getattr(result, which).CopyFrom(response)
        return pb.AttachResponse(result=result)

    async def _continue_nowait(self, request: pb.ContinueRequest) -> pb.ContinueResponse:
        """On the stream a continue never blocks the command loop: the stop comes as an event."""
        live = self.engine.sessions.get(request.name)
        await self.engine.sessions.run(live)
        return pb.ContinueResponse(state=self._state(live))


def _time_left(context: aio.ServicerContext[Any, Any] | None) -> float | None:
    """The time a waiting call may use: its deadline less a margin, so the session is
    halted and the answer (DEADLINE_EXCEEDED saying so) reaches the caller in time."""
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None else max(0.0, remaining - DEADLINE_MARGIN_SECONDS)


def _result(tag: int, exc: MachineServerError, request_id: str = "") -> pb.AttachResponse:
    return pb.AttachResponse(result=pb.DebugCommandResult(
        tag=tag, code=code_for(exc).value[0], message=exc.message, request_id=request_id))


def _internal(tag: int, request_id: str) -> pb.AttachResponse:
    return pb.AttachResponse(result=pb.DebugCommandResult(
        tag=tag, code=grpc.StatusCode.INTERNAL.value[0], request_id=request_id,
        message=f"internal error; quote request id {request_id} to the operator"))


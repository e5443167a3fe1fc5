"""Translation between the core's dataclasses and protobuf messages: the one place per
resource where the two meet."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from google.protobuf import timestamp_pb2

from machineserver.server.core import debug as dbg
from machineserver.server.core.errors import InvalidArgument
from machineserver.server.core.images import ImageFormat
from machineserver.server.core.models import (
    BoardTemplateRecord,
    ProgramRecord,
    SessionRecord,
    SnapshotRecord,
    stop_from_dict,
)
from machineserver.server.core.sessions import LiveSession, SessionEvent
from machineserver.server.drivers.base import (
    BackendInfo,
    BoardSpec,
    Feature,
    MachineState,
    StopInfo,
    StopReason,
    WatchKind,
)
from machineserver.v1 import capabilities_pb2 as caps_pb
from machineserver.v1 import common_pb2 as common_pb
from machineserver.v1 import debug_pb2 as debug_pb
from machineserver.v1 import session_pb2 as session_pb


def timestamp(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


# ---------------------------------------------------------------------- enums

STATE_TO_PB = {
    MachineState.OFF: common_pb.SESSION_STATE_OFF,
    MachineState.HALTED: common_pb.SESSION_STATE_HALTED,
    MachineState.RUNNING: common_pb.SESSION_STATE_RUNNING,
    MachineState.EXITED: common_pb.SESSION_STATE_EXITED,
    MachineState.FAULTED: common_pb.SESSION_STATE_FAULTED,
    MachineState.FAILED: common_pb.SESSION_STATE_FAILED,
}
STOP_TO_PB = {
    StopReason.BREAKPOINT: common_pb.STOP_REASON_BREAKPOINT,
    StopReason.WATCHPOINT: common_pb.STOP_REASON_WATCHPOINT,
    StopReason.STEP: common_pb.STOP_REASON_STEP,
    StopReason.HALT: common_pb.STOP_REASON_HALT,
    StopReason.EXIT: common_pb.STOP_REASON_EXIT,
    StopReason.FAULT: common_pb.STOP_REASON_FAULT,
}
WATCH_TO_PB = {
    WatchKind.READ: common_pb.WATCH_KIND_READ,
    WatchKind.WRITE: common_pb.WATCH_KIND_WRITE,
    WatchKind.ACCESS: common_pb.WATCH_KIND_ACCESS,
}
FEATURE_TO_PB = {
    Feature.RUN_CONTROL: common_pb.FEATURE_RUN_CONTROL,
    Feature.REGISTERS: common_pb.FEATURE_REGISTERS,
    Feature.MEMORY: common_pb.FEATURE_MEMORY,
    Feature.BREAKPOINTS: common_pb.FEATURE_BREAKPOINTS,
    Feature.WATCHPOINTS: common_pb.FEATURE_WATCHPOINTS,
    Feature.CONSOLE_INPUT: common_pb.FEATURE_CONSOLE_INPUT,
    Feature.SNAPSHOTS: common_pb.FEATURE_SNAPSHOTS,
    Feature.COVERAGE: common_pb.FEATURE_COVERAGE,
    Feature.LOCKSTEP: common_pb.FEATURE_LOCKSTEP,
}
FORMAT_FROM_PB = {
    session_pb.PROGRAM_FORMAT_ELF: ImageFormat.ELF,
    session_pb.PROGRAM_FORMAT_BIN: ImageFormat.BIN,
    session_pb.PROGRAM_FORMAT_IHEX: ImageFormat.IHEX,
}
FORMAT_TO_PB = {v: k for k, v in FORMAT_FROM_PB.items()}
KIND_FROM_PB = {
    debug_pb.BREAKPOINT_KIND_UNSPECIFIED: dbg.BreakpointKind.SOFTWARE,
    debug_pb.BREAKPOINT_KIND_SOFTWARE: dbg.BreakpointKind.SOFTWARE,
    debug_pb.BREAKPOINT_KIND_HARDWARE: dbg.BreakpointKind.HARDWARE,
    debug_pb.BREAKPOINT_KIND_WATCH_READ: dbg.BreakpointKind.WATCH_READ,
    debug_pb.BREAKPOINT_KIND_WATCH_WRITE: dbg.BreakpointKind.WATCH_WRITE,
    debug_pb.BREAKPOINT_KIND_WATCH_ACCESS: dbg.BreakpointKind.WATCH_ACCESS,
}
KIND_TO_PB = {v: k for k, v in KIND_FROM_PB.items() if k != debug_pb.BREAKPOINT_KIND_UNSPECIFIED}

EnumT = TypeVar("EnumT")  # a protobuf enum's ValueType
ValueT = TypeVar("ValueT")


def enum_value(table: Mapping[EnumT, ValueT], value: EnumT, field: str) -> ValueT:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(field, f"unknown value {value}") from None


# ---------------------------------------------------------------------- debug pieces


def source_pb(pos: dbg.SourcePosition) -> common_pb.SourceLocation:
    return common_pb.SourceLocation(function=pos.function, file=pos.file, line=pos.line)


def stop_pb(stop: StopInfo | None, position: dbg.SourcePosition | None = None) -> common_pb.StopEvent:
    if stop is None:
        return common_pb.StopEvent()
    msg = common_pb.StopEvent(reason=STOP_TO_PB[stop.reason], pc=stop.pc, message=stop.message)
    if stop.exit_code is not None:
        msg.exit_code = stop.exit_code
    if stop.fault_address is not None:
        msg.fault_address = stop.fault_address
    if stop.watch_address is not None:
        msg.watch_address = stop.watch_address
    if stop.watch_value is not None:
        msg.watch_value = stop.watch_value
    if stop.watch_access:
        msg.watch_kind = WATCH_TO_PB.get(WatchKind(stop.watch_access), common_pb.WATCH_KIND_UNSPECIFIED)
    if position is not None and (position.function or position.file):
        msg.location.CopyFrom(source_pb(position))
    return msg


def location_from_pb(loc: debug_pb.CodeLocation) -> dbg.Location:
    which = loc.WhichOneof("target")
    if which == "address":
        return dbg.Location(address=loc.address)
    if which == "symbol":
        return dbg.Location(symbol=loc.symbol)
    if which == "file_line":
        return dbg.Location(file_line=loc.file_line)
    return dbg.Location()


def location_pb(loc: dbg.Location) -> debug_pb.CodeLocation:
    if loc.address is not None:
        return debug_pb.CodeLocation(address=loc.address)
    if loc.symbol:
        return debug_pb.CodeLocation(symbol=loc.symbol)
    return debug_pb.CodeLocation(file_line=loc.file_line)


def breakpoint_pb(bp: dbg.Breakpoint) -> debug_pb.Breakpoint:
    return debug_pb.Breakpoint(
        id=bp.id, kind=KIND_TO_PB[bp.kind], address=bp.address, size=bp.size,
        location=location_pb(bp.location), source=source_pb(bp.source), hit_count=bp.hit_count,
    )


# ---------------------------------------------------------------------- resources


def session_record_pb(rec: SessionRecord) -> session_pb.Session:
    msg = session_pb.Session(
        name=rec.name,
        display_name=rec.display_name,
        board=rec.board,
        backend=rec.backend,
        labels=rec.labels,
        state=STATE_TO_PB[MachineState(rec.state)],
        state_reason=rec.state_reason,
        program=f"programs/{rec.program}" if rec.program else "",
        limits=session_pb.ResourceLimits(
            max_instructions=rec.max_instructions, max_console_bytes=rec.max_console_bytes
        ),
        options=session_pb.SessionOptions(
            icount=rec.icount, coverage=rec.coverage,
            remote=session_pb.RemoteTarget(address=rec.remote_target, console=rec.remote_console)
            if rec.remote_target else None,
            capsules=session_pb.CapsulePolicy(on_fault=bool(rec.capsule_policy.get("on_fault")),
                                              assert_symbols=rec.capsule_policy.get("assert_symbols", []))
            if rec.capsule_policy else None),
        create_time=timestamp(rec.create_time),
        update_time=timestamp(rec.update_time),
        owner=rec.owner,
        tenant=rec.tenant,
        board_config=rec.board_config,
        backend_details=rec.backend_details,
    )
    stop = stop_from_dict(rec.last_stop)
    if stop is not None:
        msg.last_stop.CopyFrom(stop_pb(stop))
    if rec.exit_code is not None:
        msg.exit_code = rec.exit_code
    return msg


def live_session_pb(live: LiveSession, debugger: dbg.Debugger) -> session_pb.Session:
    msg = session_record_pb(live.record)
    stop = live.last_stop
    if stop is not None:
        msg.last_stop.CopyFrom(stop_pb(stop, debugger.position(live, stop.pc)))
    return msg


def event_pb(ev: SessionEvent, position: dbg.SourcePosition | None = None) -> session_pb.StreamSessionEventsResponse:
    msg = session_pb.StreamSessionEventsResponse(
        session=f"sessions/{ev.session}",
        state=STATE_TO_PB[ev.state],
        previous_state=STATE_TO_PB[ev.previous_state],
        reason=ev.reason,
        time=timestamp(ev.time),
    )
    if ev.stop is not None:
        msg.stop.CopyFrom(stop_pb(ev.stop, position))
    return msg


def program_pb(rec: ProgramRecord) -> session_pb.Program:
    msg = session_pb.Program(
        name=rec.name,
        display_name=rec.display_name,
        format=FORMAT_TO_PB[ImageFormat(rec.format)],
        sha256=rec.sha256,
        size_bytes=rec.size_bytes,
        load_address=rec.load_address,
        arch=rec.arch,
        segments=[session_pb.ProgramSegment(address=a, size=s) for a, s in rec.segments],
        has_symbols=rec.has_symbols,
        has_debug_info=rec.has_debug_info,
        source_files=rec.source_files,
        create_time=timestamp(rec.create_time),
        owner=rec.owner,
        tenant=rec.tenant,
    )
    if rec.entry_point is not None:
        msg.entry_point = rec.entry_point
    return msg


def snapshot_pb(rec: SnapshotRecord) -> session_pb.Snapshot:
    return session_pb.Snapshot(
        name=rec.name,
        display_name=rec.display_name,
        session=f"sessions/{rec.session}" if rec.session else "",
        board=rec.board,
        backend=rec.backend,
        program=f"programs/{rec.program}" if rec.program else "",
        size_bytes=rec.size_bytes,
        sha256=rec.sha256,
        instructions=rec.instructions,
        create_time=timestamp(rec.create_time),
        owner=rec.owner,
        tenant=rec.tenant,
    )


def board_template_pb(rec: BoardTemplateRecord, spec: BoardSpec) -> caps_pb.BoardTemplate:
    return caps_pb.BoardTemplate(
        name=rec.name,
        description=spec.description,
        arch=spec.arch.value,
        cpu=spec.cpu,
        cpu_mhz=spec.cpu_mhz,
        memory=[caps_pb.MemoryRegion(name=m.name, base=m.base, size=m.size, kind=m.kind, writable=m.writable)
                for m in spec.memory],
        peripherals=[caps_pb.Peripheral(name=p.name, model=p.model, base=p.base, size=p.size, irq=p.irq)
                     for p in spec.peripherals],
        console=spec.console,
        backend_machines=dict(spec.backend_machines),
        config=rec.config,
        builtin=rec.builtin,
        etag=rec.etag,
        owner=rec.owner,
        tenant=rec.tenant,
    )


def backend_pb(info: BackendInfo, features: frozenset[Feature], boards: list[str]) -> caps_pb.Backend:
    return caps_pb.Backend(
        name=info.name,
        description=info.description,
        available=info.available,
        unavailable_reason=info.unavailable_reason,
        version=info.version,
        features=sorted(FEATURE_TO_PB[f] for f in features),
        boards=boards,
        board_limits=[
            caps_pb.BoardLimit(board=board, feature=FEATURE_TO_PB[f], reason=reason)
            for board, limits in sorted(info.board_limits.items())
            for f, reason in sorted(limits.items())
        ],
        details=dict(info.details),
        partial_features=[caps_pb.PartialFeature(feature=FEATURE_TO_PB[f], note=note)
                          for f, note in sorted(info.partial.items())],
    )

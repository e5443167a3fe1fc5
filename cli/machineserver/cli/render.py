"""Human output: how msctl shows each response for people (``-o table``, the default).

:func:`generic` shows any message as indented ``key: value`` lines (addresses in hex,
enums by short name, timestamps in local time, bytes as a short hexdump); the renderers
registered below with :func:`machineserver.cli.output.human` give the common answers a
shape of their own: registers and lists as tables, memory as a hexdump, disassembly as a
listing, sessions in a line or two (never their board YAML), an empty answer as one line
saying what happened, a stream's messages one line each.

Tables are drawn by rich; not to a terminal (a pipe, a file) without colour and wide
enough that no row is cut or wrapped.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any, cast

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text

from machineserver.v1 import (
    capabilities_pb2,
    common_pb2,
    coverage_pb2,
    debug_pb2,
    session_pb2,
    telemetry_pb2,
)

V1 = "machineserver.v1."
# fields shown in hex wherever they are (by name; also any *_address)
HEX_FIELDS = frozenset({"address", "pc", "sp", "lr", "cfa", "base", "start", "end", "entry_point",
                        "load_address", "fault_address", "watch_address", "doorbell_address", "value_mask"})
BYTES_SHOWN = 16  # a bytes field in generic output: this many bytes, then how many more
PIPE_WIDTH = 100_000  # not to a terminal: wide enough that rows stay whole
# a renderer: prints one response message for people
Renderer = Callable[[Message, argparse.Namespace], None]

# ---------------------------------------------------------------------- plain values


def console() -> Console:
    """Rich output to stdout; not to a terminal: no colour, no markup guessing, no wrapping."""
    probe = Console(highlight=False)
    if probe.is_terminal:
        return probe
    return Console(width=PIPE_WIDTH, no_color=True, highlight=False, soft_wrap=True, emoji=False)


def print_table(table: Table, out: Console | None = None) -> None:
    """A table to ``out`` (default: :func:`console`, stdout); not to a terminal: lines
    without the blanks rich pads cells with, and no blank lines before or after."""
    out = out or console()
    if out.is_terminal:
        out.print(table)
        return
    with out.capture() as captured:
        out.print(table)
    lines = [line.rstrip() for line in captured.get().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    print("\n".join(lines), file=out.file, flush=True)


def new_table(*headers: str) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


def add_row(table: Table, *cells: object) -> None:
    """Cells as plain text (no rich markup read in them)."""
    table.add_row(*(Text(str(cell)) for cell in cells))


def enum_prefix(enum: EnumDescriptor) -> str:
    """``SessionState`` -> ``SESSION_STATE_``: what every value's name starts with."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", enum.name).upper() + "_"


def enum_label(enum: EnumDescriptor, number: int) -> str:
    """An enum value's short lower-case name: SESSION_STATE_RUNNING -> running."""
    value = enum.values_by_number.get(number)
    if value is None:
        return str(number)
    return value.name.removeprefix(enum_prefix(enum)).lower()


def state_label(state: int) -> str:
    return enum_label(common_pb2.SessionState.DESCRIPTOR, state)


def field_value(msg: Message, name: str) -> Any:
    """Field ``name`` of a message whose type the caller knows only by its descriptor."""
    return getattr(msg, name)


def descriptor(msg: Message) -> Descriptor:
    return cast(Descriptor, msg.DESCRIPTOR)


def hex_addr(value: int) -> str:
    return f"0x{value:08x}"


def local_time(ts: timestamp_pb2.Timestamp) -> str:
    """A timestamp in local time, to the second: 2025-01-31 14:02:03."""
    return ts.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration_text(d: duration_pb2.Duration) -> str:
    seconds = d.seconds + d.nanos / 1e9
    return f"{seconds:g}s"


def ns_text(ns: int) -> str:
    """Nanoseconds in the unit that reads best: 1.234 ms."""
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3f} {unit}"
    return f"{ns} ns"


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def short_bytes(data: bytes) -> str:
    """Bytes in a line: up to BYTES_SHOWN in hex, then how many there are in all."""
    text = data[:BYTES_SHOWN].hex(" ")
    return text if len(data) <= BYTES_SHOWN else f"{text} ... ({len(data)} bytes)"


def hexdump(address: int, data: bytes) -> Iterator[str]:
    """``0x20000000  48 65 6c 6c 6f ...  |Hello...|``: 16 bytes a line from ``address``."""
    for start in range(0, len(data), 16):
        row = data[start:start + 16]
        hex_part = " ".join(f"{b:02x}" for b in row[:8]) + "  " + " ".join(f"{b:02x}" for b in row[8:])
        ascii_part = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        yield f"{hex_addr(address + start)}  {hex_part:<48}  |{ascii_part}|"


def is_hex_field(field: FieldDescriptor) -> bool:
    return field.name in HEX_FIELDS or field.name.endswith("_address")


def scalar_text(field: FieldDescriptor, value: object) -> str:
    """One scalar field's value for people."""
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None and isinstance(value, int)
        return enum_label(field.enum_type, value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        assert isinstance(value, bytes)
        return short_bytes(value)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "yes" if value else "no"
    if isinstance(value, int) and is_hex_field(field):
        return hex_addr(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def inline_message(msg: Message) -> str | None:
    """Messages that read as one value (a time, a duration, a source line); None otherwise."""
    if isinstance(msg, timestamp_pb2.Timestamp):
        return local_time(msg)
    if isinstance(msg, duration_pb2.Duration):
        return duration_text(msg)
    if isinstance(msg, common_pb2.SourceLocation):
        return source_text(msg)
    return None


# ---------------------------------------------------------------------- generic


def field_lines(msg: Message, indent: int = 0) -> Iterator[str]:
    """A message's set fields as ``key: value`` lines, nested messages indented."""
    pad = " " * indent
    for field, value in msg.ListFields():
        key = field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            yield f"{pad}{key}:"
            value_field = field.message_type.fields_by_name["value"]
            for k in sorted(value):
                item = value[k]
                if isinstance(item, Message):
                    yield f"{pad}  {k}:"
                    yield from field_lines(item, indent + 4)
                else:
                    yield f"{pad}  {k}: {scalar_text(value_field, item)}"
        elif field.is_repeated and field.message_type is not None:
            yield f"{pad}{key}:"
            for item in value:
                inline = inline_message(item)
                if inline is not None:
                    yield f"{pad}  - {inline}"
                    continue
                lines = list(field_lines(item, indent + 4)) or [f"{pad}    (empty)"]
                yield f"{pad}  - {lines[0].lstrip()}"
                yield from lines[1:]
        elif field.is_repeated:
            yield f"{pad}{key}: {', '.join(scalar_text(field, v) for v in value)}"
        elif field.message_type is not None:
            inline = inline_message(value)
            if inline is not None:
                yield f"{pad}{key}: {inline}"
            else:
                yield f"{pad}{key}:"
                yield from field_lines(value, indent + 2)
        elif isinstance(value, str) and "\n" in value.rstrip("\n"):
            yield f"{pad}{key}:"
            yield from (f"{pad}  {line}" for line in value.rstrip("\n").splitlines())
        else:
            yield f"{pad}{key}: {scalar_text(field, value)}"


def generic(msg: Message, args: argparse.Namespace) -> None:
    """Any message: a list as a table, an empty answer as one line saying what happened,
    anything else as indented ``key: value`` lines."""
    if list_field(descriptor(msg)) is not None:
        show_list(msg)
        return
    if not msg.ListFields():
        print(done_line(args), flush=True)
        return
    print("\n".join(field_lines(msg)), flush=True)


# ---------------------------------------------------------------------- empty answers

# RPC -> what it did, said of the request's name
DONE = {
    "DeleteSession": "{name} deleted", "DeleteProgram": "{name} deleted", "DeleteSnapshot": "{name} deleted",
    "DeleteBoardTemplate": "{name} deleted", "DeleteCoSimulation": "{name} deleted",
    "DeleteCoSimSnapshot": "{name} deleted", "DeleteAlertRule": "{name} deleted", "DeleteCapsule": "{name} deleted",
    "StartCoverage": "coverage started on {name}", "StopCoverage": "coverage stopped on {name}",
    "ResetCoverage": "coverage reset on {name}", "ClearBreakpoint": "breakpoint {id} cleared on {name}",
    "StopGdbServer": "gdb server stopped on {name}", "Halt": "{name} halted", "Continue": "{name} continued",
    "PauseSession": "{name} paused", "RunSession": "{name} running", "ResetSession": "{name} reset",
    "PowerOnSession": "{name} powered on", "PowerOffSession": "{name} powered off",
    "WriteRegister": "register written on {name}", "WriteMemory": "memory written on {name}",
    "WriteConsole": "console input sent to {name}",
}


# groups whose RPCs name a session unless they name a program, snapshot or report
SESSION_GROUPS = ("session", "debug", "coverage")
NOT_SESSIONS = ("Program", "Snapshot", "Report")


def request_name(args: argparse.Namespace) -> str:
    """The request's resource name as the server says it: a bare session ID given to a
    session's RPC becomes ``sessions/ID``."""
    name = str(getattr(args, "f_name", None) or getattr(args, "pos_name", None) or "")
    method = str(getattr(args, "rpc_method", "") or "")
    if name and "/" not in name and getattr(args, "group", None) in SESSION_GROUPS \
            and not any(word in method for word in NOT_SESSIONS):
        return f"sessions/{name}"
    return name


def done_line(args: argparse.Namespace) -> str:
    """An empty answer in one line: what the RPC did to the request's name."""
    method = str(getattr(args, "rpc_method", "") or "")
    name = request_name(args)
    phrase = DONE.get(method)
    if phrase is not None and name:
        return phrase.format(name=name, id=getattr(args, "f_id", None) or "")
    if method:
        return f"{method} done on {name}" if name else f"{method} done"
    return "done"


# ---------------------------------------------------------------------- lists

Column = tuple[str, Callable[[Message], object]]


def _f(name: str) -> Callable[[Message], object]:
    """A column showing one field of the row's message, as :func:`scalar_text` would."""
    def cell(msg: Message) -> object:
        field = descriptor(msg).fields_by_name[name]
        value = getattr(msg, name)
        if field.message_type is not None:
            return inline_message(value) or "" if msg.HasField(name) else ""
        if field.is_repeated:
            return ", ".join(scalar_text(field, v) for v in value)
        return scalar_text(field, value) if value or field.type == FieldDescriptor.TYPE_ENUM else ""
    return cell


def _percent(hit: int, total: int) -> str:
    return f"{100 * hit / total:.1f}% ({hit}/{total})" if total else "-"


def _memory_summary(t: Message) -> str:
    assert isinstance(t, capabilities_pb2.BoardTemplate)
    return ", ".join(f"{m.kind or m.name} {size_text(m.size)}@{hex_addr(m.base)}" for m in t.memory)


def _board_backends(t: Message) -> str:
    assert isinstance(t, capabilities_pb2.BoardTemplate)
    return ", ".join(sorted(t.backend_machines))


def _mhz(t: Message) -> str:
    assert isinstance(t, capabilities_pb2.BoardTemplate)
    return f"{t.cpu_mhz:g}" if t.cpu_mhz else ""


def _coverage_totals(kind: str) -> Callable[[Message], object]:
    def cell(r: Message) -> object:
        c = field_value(r, "totals")
        return _percent(getattr(c, f"{kind}_hit"), getattr(c, f"{kind}_total"))
    return cell


def _counts(field: str) -> Callable[[Message], object]:
    return lambda job: getattr(field_value(job, "counts"), field)


def _virtual_time(msg: Message) -> str:
    return ns_text(field_value(msg, "virtual_time_ns"))


def _breakpoint_where(b: Message) -> str:
    assert isinstance(b, debug_pb2.Breakpoint)
    where = source_text(b.source) if b.HasField("source") else ""
    target = b.location.WhichOneof("target")
    wanted = "" if target in (None, "address") else str(getattr(b.location, target))
    return where or wanted


COLUMNS: dict[str, list[Column]] = {
    V1 + "Session": [("NAME", _f("name")), ("STATE", _f("state")), ("BOARD", _f("board")),
                     ("BACKEND", _f("backend")), ("PROGRAM", _f("program")), ("REASON", _f("state_reason"))],
    V1 + "Program": [("NAME", _f("name")), ("FILE", _f("display_name")), ("FORMAT", _f("format")),
                     ("BYTES", _f("size_bytes")), ("ARCH", _f("arch")), ("SHA256", lambda p: field_value(p, "sha256")[:16]),
                     ("CREATED", _f("create_time"))],
    V1 + "Snapshot": [("NAME", _f("name")), ("SESSION", _f("session")), ("BOARD", _f("board")),
                      ("BACKEND", _f("backend")), ("BYTES", _f("size_bytes")), ("INSTRUCTIONS", _f("instructions")),
                      ("CREATED", _f("create_time"))],
    V1 + "CoverageReport": [("NAME", _f("name")), ("PROGRAM", _f("program")), ("SESSIONS", _f("sessions")),
                            ("LINES", _coverage_totals("lines")), ("FUNCTIONS", _coverage_totals("functions")),
                            ("BRANCHES", _coverage_totals("branches")), ("CREATED", _f("create_time"))],
    V1 + "Job": [("NAME", _f("name")), ("STATE", _f("state")), ("TOTAL", _counts("total")),
                 ("PASSED", _counts("passed")), ("FAILED", _counts("failed")), ("ERRORED", _counts("errored")),
                 ("ENGINE", _f("engine")), ("CREATED", _f("create_time"))],
    V1 + "JobRun": [("NAME", _f("name")), ("PROGRAM", _f("program")), ("BOARD", _f("board")),
                    ("BACKEND", _f("backend")), ("VERDICT", _f("verdict")), ("EXIT", _f("exit_code")),
                    ("INSTRUCTIONS", _f("instructions")), ("REASON", _f("failure_reason"))],
    V1 + "Capsule": [("NAME", _f("name")), ("TRIGGER", _f("trigger")), ("SESSION", _f("session")),
                     ("BOARD", _f("board")), ("PC", lambda c: hex_addr(field_value(c, "pc"))),
                     ("CREATED", _f("create_time")), ("REASON", _f("reason"))],
    V1 + "AlertRule": [("NAME", _f("name")), ("METRIC", _f("metric")), ("COMPARISON", _f("comparison")),
                       ("THRESHOLD", lambda r: f"{field_value(r, 'threshold'):g}"), ("FOR", _f("duration"))],
    V1 + "ApiKey": [("NAME", _f("name")), ("DISPLAY NAME", _f("display_name")), ("PRINCIPAL", _f("principal")),
                    ("TENANT", _f("tenant")), ("ROLES", _f("roles")), ("PREFIX", _f("secret_prefix")),
                    ("EXPIRES", _f("expire_time")), ("REVOKED", _f("revoke_time"))],
    V1 + "BoardTemplate": [("NAME", lambda t: field_value(t, "name").removeprefix("boardTemplates/")),
                           ("ARCH", _f("arch")), ("CPU", _f("cpu")), ("MHZ", _mhz), ("MEMORY", _memory_summary),
                           ("BACKENDS", _board_backends)],
    V1 + "CoSimulation": [("NAME", _f("name")), ("STATE", _f("state")), ("SESSIONS", _f("sessions")),
                          ("VIRTUAL TIME", _virtual_time), ("QUANTA", _f("quanta")), ("REASON", _f("state_reason"))],
    V1 + "CoSimSnapshot": [("NAME", _f("name")), ("VIRTUAL TIME", _virtual_time), ("QUANTA", _f("quanta")),
                           ("BYTES", _f("size_bytes")), ("CREATED", _f("create_time"))],
    V1 + "AuditEvent": [("SEQ", _f("sequence")), ("TIME", _f("time")), ("PRINCIPAL", _f("principal")),
                        ("METHOD", _f("method")), ("RESOURCE", _f("resource")), ("CODE", _f("code"))],
    V1 + "Breakpoint": [("ID", _f("id")), ("KIND", _f("kind")), ("ADDRESS", lambda b: hex_addr(field_value(b, "address"))),
                        ("WHERE", _breakpoint_where), ("HITS", lambda b: field_value(b, "hit_count"))],
    V1 + "QuotaUsage": [("LIMIT", _f("limit")), ("USED", lambda q: field_value(q, "used")),
                        ("MAXIMUM", lambda q: field_value(q, "maximum"))],
}
# a list field's name -> what "no ..." calls its items, when the field's name says less
LIST_NOUNS = {"reports": "coverage reports", "rules": "alert rules", "events": "audit events", "runs": "job runs",
              "quotas": "quotas", "cosimulations": "co-simulations"}


def list_field(desc: Descriptor) -> FieldDescriptor | None:
    """The one repeated message field of a list response (its other fields scalars), or None."""
    repeated = [f for f in desc.fields if f.is_repeated and f.message_type is not None
                and not f.message_type.GetOptions().map_entry]
    if len(repeated) != 1 or any(f.message_type is not None and not f.is_repeated for f in desc.fields):
        return None
    return repeated[0]


def default_columns(desc: Descriptor) -> list[Column]:
    """Columns for a row type without its own: the name, then a few plain fields."""
    plain = [f for f in desc.fields if f.message_type is None and not f.is_repeated
             and f.type != FieldDescriptor.TYPE_BYTES]
    plain.sort(key=lambda f: f.name != "name")
    return [(f.name.upper().replace("_", " "), _f(f.name)) for f in plain[:6]]


def show_list(msg: Message) -> None:
    """A list response: its rows as a table, then the next page's token when there is one."""
    field = list_field(descriptor(msg))
    assert field is not None and field.message_type is not None
    for other, value in msg.ListFields():
        if other is not field and other.name != "next_page_token":
            print(f"{other.name}: {scalar_text(other, value)}")
    rows = getattr(msg, field.name)
    if not rows:
        print(f"no {LIST_NOUNS.get(field.name, field.name.replace('_', ' '))}", flush=True)
    else:
        columns = COLUMNS.get(field.message_type.full_name) or default_columns(field.message_type)
        table = new_table(*(header for header, _ in columns))
        for row in rows:
            add_row(table, *(cell(row) for _, cell in columns))
        print_table(table)
    token = getattr(msg, "next_page_token", "")
    if token:
        print(f"next page: --page-token {token}", flush=True)


# ---------------------------------------------------------------------- sessions and stops


def source_text(loc: common_pb2.SourceLocation) -> str:
    """``main (hello.c:12)``, ``hello.c:12`` or ``main``."""
    where = f"{loc.file}:{loc.line}" if loc.file else ""
    if loc.function and where:
        return f"{loc.function} ({where})"
    return loc.function or where


def stop_text(stop: common_pb2.StopEvent) -> str:
    """Why and where a machine stopped, in a line."""
    reason = enum_label(common_pb2.StopReason.DESCRIPTOR, stop.reason)
    text = f"{reason} at {hex_addr(stop.pc)}"
    if stop.HasField("location") and (where := source_text(stop.location)):
        text += f" in {where}"
    if stop.reason == common_pb2.STOP_REASON_EXIT:
        text += f", exit code {stop.exit_code}"
    if stop.reason == common_pb2.STOP_REASON_FAULT and stop.fault_address:
        text += f", fault address {hex_addr(stop.fault_address)}"
    if stop.reason == common_pb2.STOP_REASON_WATCHPOINT:
        kind = enum_label(common_pb2.WatchKind.DESCRIPTOR, stop.watch_kind)
        text += f", {kind} {hex_addr(stop.watch_address)} = {stop.watch_value:#x}"
    if stop.message:
        text += f": {stop.message}"
    return text


def session_lines(s: session_pb2.Session) -> Iterator[str]:
    """A session in a line or a few: never its board config."""
    head = [s.name, f"state={state_label(s.state)}", f"board={s.board}", f"backend={s.backend}"]
    if s.program:
        head.append(f"program={s.program}")
    yield "  ".join(head)
    if s.display_name:
        yield f"  display name: {s.display_name}"
    if s.state_reason:
        yield f"  reason: {s.state_reason}"
    if s.state == common_pb2.SESSION_STATE_EXITED:
        yield f"  exit code: {s.exit_code}"
    if s.HasField("last_stop") and s.last_stop.reason:
        yield f"  last stop: {stop_text(s.last_stop)}"


def session_details(s: session_pb2.Session) -> Iterator[str]:
    """What get-session adds to :func:`session_lines`: who, when, labels, options,
    limits and the backend's details (still never the board config: -o yaml has it)."""
    if s.owner or s.tenant:
        yield f"  owner: {s.owner or '-'}  tenant: {s.tenant or '-'}"
    if s.HasField("create_time"):
        yield f"  created: {local_time(s.create_time)}"
    if s.labels:
        yield "  labels: " + ", ".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
    for key in ("options", "limits"):
        if s.HasField(key) and (inline := inline_message(getattr(s, key))):
            yield f"  {key}: {inline}"
    if s.backend_details:
        yield "  backend details:"
        yield from (f"    {k}: {v}" for k, v in sorted(s.backend_details.items()))


def show_session(msg: Message, args: argparse.Namespace) -> None:
    lines = list(session_lines(field_value(msg, "session")))
    if isinstance(msg, session_pb2.GetSessionResponse):
        lines.extend(session_details(msg.session))
    if msg.DESCRIPTOR.fields_by_name.get("stop") is not None and msg.HasField("stop"):
        lines.append(f"  stopped: {stop_text(field_value(msg, 'stop'))}")
    print("\n".join(lines), flush=True)


def show_stop(msg: Message, args: argparse.Namespace) -> None:
    """Step, StepLine, Continue, Halt: where the target is now."""
    state = state_label(field_value(msg, "state"))
    parts = [request_name(args) or "target", state]
    if msg.HasField("stop") and field_value(msg, "stop").reason:
        parts.append(stop_text(field_value(msg, "stop")))
    if "outcome" in msg.DESCRIPTOR.fields_by_name and field_value(msg, "outcome"):
        parts.append("outcome " + enum_label(common_pb2.WaitOutcome.DESCRIPTOR, field_value(msg, "outcome")))
    print("  ".join(parts), flush=True)


# ---------------------------------------------------------------------- debug


def show_registers(msg: Message, args: argparse.Namespace) -> None:
    assert isinstance(msg, debug_pb2.ReadRegistersResponse)
    if not msg.registers:
        print("no registers", flush=True)
        return
    table = new_table("NAME", "HEX", "DEC")
    table.columns[1].justify = table.columns[2].justify = "right"
    for r in msg.registers:
        digits = max(8, (r.size_bits or 32) // 4)
        add_row(table, r.name, f"0x{r.value:0{digits}x}", r.value)
    print_table(table)


def show_register(msg: Message, args: argparse.Namespace) -> None:
    assert isinstance(msg, debug_pb2.WriteRegisterResponse)
    r = msg.register
    print(f"{r.name} = 0x{r.value:0{max(8, (r.size_bits or 32) // 4)}x} ({r.value})", flush=True)


def show_memory(msg: Message, args: argparse.Namespace) -> None:
    assert isinstance(msg, debug_pb2.ReadMemoryResponse)
    if not msg.data:
        print(f"{hex_addr(msg.address)}: no bytes", flush=True)
        return
    print("\n".join(hexdump(msg.address, msg.data)), flush=True)


def instruction_line(i: debug_pb2.Instruction) -> str:
    """``0x00000400 <main+4>:  movs r0, #1``."""
    symbol = f" <{i.symbol}>" if i.symbol else ""
    return f"{hex_addr(i.address)}{symbol}:  {i.mnemonic} {i.operands}".rstrip()


def show_disassembly(msg: Message, args: argparse.Namespace) -> None:
    assert isinstance(msg, debug_pb2.DisassembleResponse)
    print("\n".join(instruction_line(i) for i in msg.instructions) or "no instructions", flush=True)


def show_backtrace(msg: Message, args: argparse.Namespace) -> None:
    assert isinstance(msg, debug_pb2.BacktraceResponse)
    lines = []
    for f in msg.frames:
        where = f" in {source_text(f.location)}" if f.HasField("location") and source_text(f.location) else ""
        lines.append(f"#{f.level:<2} {hex_addr(f.pc)}{where}")
    print("\n".join(lines) or "no frames", flush=True)


def show_symbol(msg: Message, args: argparse.Namespace) -> None:
    assert isinstance(msg, debug_pb2.ResolveSymbolResponse)
    name = msg.symbol + (f"+{msg.offset}" if msg.offset else "")
    line = f"{name} = {hex_addr(msg.address)}"
    if msg.size:
        line += f"  size {msg.size}"
    if msg.HasField("source") and (where := source_text(msg.source)):
        line += f"  {where}"
    print(line, flush=True)


def show_breakpoint(msg: Message, args: argparse.Namespace) -> None:
    assert isinstance(msg, debug_pb2.SetBreakpointResponse)
    b = msg.breakpoint
    kind = enum_label(debug_pb2.BreakpointKind.DESCRIPTOR, b.kind)
    where = _breakpoint_where(b)
    print(f"{kind} {b.id} at {hex_addr(b.address)}" + (f"  {where}" if where else ""), flush=True)


def show_gdb_server(msg: Message, args: argparse.Namespace) -> None:
    assert isinstance(msg, debug_pb2.StartGdbServerResponse)
    g = msg.gdb_server
    halt = ", halts the target on detach" if g.halt_on_detach else ""
    where = f"{g.address}:{g.port}" if g.port else g.address
    print(f"gdb server for {g.session} on {where}{halt}  (gdb: target remote {where})", flush=True)


# ---------------------------------------------------------------------- streams


def show_console(msg: Message, args: argparse.Namespace) -> None:
    """Console bytes as they are, to stdout; marks (a reset, a power-on) on a line of their own."""
    assert isinstance(msg, session_pb2.StreamConsoleResponse)
    out = sys.stdout.buffer
    data = msg.data
    done = 0
    for mark in sorted(msg.marks, key=lambda m: m.offset):
        cut = max(0, min(len(data), mark.offset - msg.offset))
        out.write(data[done:cut])
        kind = enum_label(session_pb2.ConsoleMarkKind.DESCRIPTOR, mark.kind).replace("_", " ")
        detail = f": {mark.detail}" if mark.detail else ""
        newline = "" if cut == 0 or data[cut - 1:cut] == b"\n" else "\n"
        out.write(f"{newline}--- {kind}{detail} ---\n".encode())
        done = cut
    out.write(data[done:])
    if msg.dropped_bytes:
        out.write(f"\n--- {msg.dropped_bytes} bytes dropped ---\n".encode())
    out.flush()


def show_session_event(msg: Message, args: argparse.Namespace) -> None:
    assert isinstance(msg, session_pb2.StreamSessionEventsResponse)
    if msg.HasField("subscribed"):
        for s in msg.subscribed.sessions:
            print(f"{s.name}  {state_label(s.state)}  (now)", flush=True)
        return
    when = local_time(msg.time) if msg.HasField("time") else ""
    parts = [when, msg.session, f"{state_label(msg.previous_state)} -> {state_label(msg.state)}"]
    if msg.reason:
        parts.append(msg.reason)
    if msg.HasField("stop") and msg.stop.reason:
        parts.append(stop_text(msg.stop))
    print("  ".join(p for p in parts if p), flush=True)


def metrics_line(m: telemetry_pb2.SessionMetrics) -> str:
    """A session's metrics in a line; counts not counted exactly say so."""
    # not exact: an estimate from host time (Unicorn without its native counter), or
    # nothing counted at all (QEMU without its plugin reports 0)
    est = "" if m.counts_exact else " (not counted)" if m.instructions == 0 else " (estimated)"
    parts = [local_time(m.time) if m.HasField("time") else "", m.session, state_label(m.state),
             f"instructions {m.instructions:,}{est}", f"virtual time {ns_text(m.virtual_time_ns)}{est}",
             f"{m.mips:.2f} MIPS{est}", f"host cpu {m.host_cpu_percent:.1f}%",
             f"memory {size_text(m.host_memory_bytes)}"]
    if m.host_usage_note:
        parts.append(f"({m.host_usage_note})")
    return "  ".join(p for p in parts if p)


def show_metrics(msg: Message, args: argparse.Namespace) -> None:
    print(metrics_line(field_value(msg, "metrics")), flush=True)


def show_alert(msg: Message, args: argparse.Namespace) -> None:
    assert isinstance(msg, telemetry_pb2.StreamAlertsResponse)
    if msg.HasField("subscribed"):
        firing = msg.subscribed.firing
        print(f"subscribed; {len(firing)} firing" + "".join(f"\n  {a.rule}: {a.message}" for a in firing),
              flush=True)
        return
    when = local_time(msg.time) if msg.HasField("time") else ""
    state = enum_label(telemetry_pb2.AlertState.DESCRIPTOR, msg.state)
    parts = [when, msg.rule, state, f"{msg.metric} {msg.value:g} (threshold {msg.threshold:g})", msg.message]
    print("  ".join(p for p in parts if p), flush=True)


def show_host_status(msg: Message, args: argparse.Namespace) -> None:
    from machineserver.cli import watch

    status = field_value(msg, "status")
    dropped = getattr(msg, "dropped", 0)
    print(watch.render(telemetry_pb2.StreamHostStatusResponse(status=status, dropped=dropped)), flush=True)


def show_chunk(msg: Message, args: argparse.Namespace) -> None:
    """Export streams: the file's bytes to stdout as they are, what it is to stderr."""
    for field, value in msg.ListFields():
        if field.name == "chunk":
            sys.stdout.buffer.write(value)
            sys.stdout.buffer.flush()
        elif field.message_type is not None:
            print(" ".join(line.strip() for line in field_lines(value) if ":" in line and len(line) < 120),
                  file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- other answers


def show_caps(msg: Message, args: argparse.Namespace) -> None:
    assert isinstance(msg, capabilities_pb2.GetCapabilitiesResponse)
    print(f"MachineServer {msg.server_version} ({msg.api_version}), default backend: {msg.default_backend}")
    table = new_table("BACKEND", "AVAILABLE", "VERSION", "BOARDS", "FEATURES")
    for b in msg.backends:
        feats = ",".join(enum_label(common_pb2.Feature.DESCRIPTOR, f) for f in b.features)
        add_row(table, b.name, "yes" if b.available else f"no: {b.unavailable_reason}", b.version,
                " ".join(b.boards), feats)
    print_table(table)


def show_board_template(msg: Message, args: argparse.Namespace) -> None:
    t = field_value(msg, "board_template")
    assert isinstance(t, capabilities_pb2.BoardTemplate)
    lines = [f"{t.name}  arch={t.arch} cpu={t.cpu}" + (f" {t.cpu_mhz:g} MHz" if t.cpu_mhz else "")]
    if t.description:
        lines.append(f"  {t.description}")
    for m in t.memory:
        lines.append(f"  memory {m.name:<10} {hex_addr(m.base)} {size_text(m.size):>10}  {m.kind}")
    for p in t.peripherals:
        lines.append(f"  peripheral {p.name} at {hex_addr(p.base)}")
    if t.backend_machines:
        lines.append("  backends: " + ", ".join(f"{k} ({v})" for k, v in sorted(t.backend_machines.items())))
    print("\n".join(lines), flush=True)


def show_program(msg: Message, args: argparse.Namespace) -> None:
    p = field_value(msg, "program")
    assert isinstance(p, session_pb2.Program)
    fmt = enum_label(session_pb2.ProgramFormat.DESCRIPTOR, p.format)
    note = " (already stored)" if getattr(msg, "deduplicated", False) else ""
    print(f"{p.name}  {p.display_name}  {fmt} {p.size_bytes} bytes  {p.arch}  entry {hex_addr(p.entry_point)}  "
          f"sha256={p.sha256[:16]}{note}", flush=True)


def show_coverage_summary(msg: Message, args: argparse.Namespace) -> None:
    assert isinstance(msg, coverage_pb2.GetCoverageSummaryResponse)
    table = new_table("FILE", "LINES", "FUNCTIONS", "BRANCHES")
    for f in msg.files:
        c = f.counts
        add_row(table, f.path, _percent(c.lines_hit, c.lines_total), _percent(c.functions_hit, c.functions_total),
                _percent(c.branches_hit, c.branches_total))
    t = msg.totals
    add_row(table, "TOTAL", _percent(t.lines_hit, t.lines_total), _percent(t.functions_hit, t.functions_total),
            _percent(t.branches_hit, t.branches_total))
    print_table(table)


def register(human: Callable[..., Callable[[Renderer], Renderer]]) -> None:
    """Register this module's renderers with :func:`machineserver.cli.output.human`."""
    session_answers = ("CreateSession", "GetSession", "PowerOnSession", "PowerOffSession", "ResetSession",
                       "RunSession", "PauseSession", "LoadProgram", "RestoreSnapshot", "OpenCapsule")
    human(*(f"{V1}{n}Response" for n in session_answers))(show_session)
    human(*(f"{V1}{n}Response" for n in ("Step", "StepLine", "Continue", "Halt")))(show_stop)
    human(V1 + "ReadRegistersResponse")(show_registers)
    human(V1 + "WriteRegisterResponse")(show_register)
    human(V1 + "ReadMemoryResponse")(show_memory)
    human(V1 + "DisassembleResponse")(show_disassembly)
    human(V1 + "BacktraceResponse")(show_backtrace)
    human(V1 + "ResolveSymbolResponse")(show_symbol)
    human(V1 + "SetBreakpointResponse")(show_breakpoint)
    human(V1 + "StartGdbServerResponse")(show_gdb_server)
    human(V1 + "StreamConsoleResponse")(show_console)
    human(V1 + "StreamSessionEventsResponse")(show_session_event)
    human(V1 + "GetSessionMetricsResponse", V1 + "StreamSessionMetricsResponse")(show_metrics)
    human(V1 + "StreamAlertsResponse")(show_alert)
    human(V1 + "GetHostStatusResponse", V1 + "StreamHostStatusResponse")(show_host_status)
    human(*(f"{V1}{n}Response" for n in ("ExportCoverage", "ExportSnapshot", "ExportCoSimSnapshot",
                                         "ExportCapsule", "ExportJobJunit")))(show_chunk)
    human(V1 + "GetCapabilitiesResponse")(show_caps)
    human(*(f"{V1}{n}BoardTemplateResponse" for n in ("Get", "Create", "Update")))(show_board_template)
    human(V1 + "UploadProgramResponse", V1 + "GetProgramResponse")(show_program)
    human(V1 + "GetCoverageSummaryResponse")(show_coverage_summary)

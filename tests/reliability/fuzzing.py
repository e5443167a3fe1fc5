"""R1's machinery: requests generated from the protobuf descriptors, sent to a real server
over gRPC, and what the server may answer.

* :func:`random_request` builds any type-valid message for a method's input type, field by
  field from its descriptor (scalars at their edges, odd and huge strings, names with
  ``..`` and ``/``, forged page tokens, names of resources that exist); :func:`mutated_request`
  takes a valid-looking request for the method and changes one or two of its fields.
* :class:`FuzzServer` runs a server in this process on a thread of its own (so the
  :class:`FileAudit` sees every file it touches) and sends cases to it with a plain sync
  channel: unary, server streams (a few messages read, then cancelled), client streams
  (a few messages sent) and Attach.
* :class:`FileAudit` is a ``sys.addaudithook`` hook that records every file the process
  opens, creates, renames or deletes, and every command it runs, outside the roots a
  server may read (its sources, the venv, /proc) or write (its data directory).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from machineserver.server.api.server import SERVICES
from machineserver.server.app import RunningServer, start
from machineserver.server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]

# The codes the API documents (DESIGN.md "Errors"; api/errors.py's table) plus what a
# client's own deadline or cancel gives; UNKNOWN, INTERNAL and DATA_LOSS are never fine.
DOCUMENTED = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
})
UNARY_DEADLINE_S = 3.0
STREAM_DEADLINE_S = 0.6
STREAM_MESSAGES = 3  # a server stream is read this far, then cancelled

CLIENT_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                  ("grpc.use_local_subchannel_pool", 1)]


def served_methods() -> list[MethodDescriptor]:
    """Every method of every service the server registers (api/server.py's SERVICES), so a
    service or method added later is fuzzed without a change here."""
    out: list[MethodDescriptor] = []
    for _, _, file, name in SERVICES:
        out.extend(file.services_by_name[name].methods)
    return out


def method_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def message_class(desc: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


# ---------------------------------------------------------------------- odd inputs


def _token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def _fingerprint(text: str) -> str:  # core/listing.py's, so a forged token passes that check
    return hashlib.sha256(text.encode()).hexdigest()[:8]


FORGED_TOKENS = [
    _token(b'{"o": 1e400, "f": "%s"}' % _fingerprint("").encode()),
    _token(b'{"o": -1e400, "f": "%s"}' % _fingerprint("").encode()),
    _token(b'{"o": NaN, "f": "%s"}' % _fingerprint("").encode()),
    _token(json.dumps({"o": 10**30, "f": _fingerprint("")}).encode()),
    _token(json.dumps({"o": 2**63, "f": _fingerprint("")}).encode()),
    _token(json.dumps({"o": -5, "f": _fingerprint("")}).encode()),
    _token(json.dumps({"o": "x", "f": _fingerprint("")}).encode()),
    _token(json.dumps({"o": [1], "f": {"a": 1}}).encode()),
    _token(json.dumps([1, 2]).encode()),
    _token(b"null"),
    _token(b"\xff\xfe\x00garbage"),
    _token(b"[" * 5000 + b"]" * 5000),
    "not base64 at all!!",
    "=",
    "a" * 70000,
]


def odd_strings(canary: Path) -> list[str]:
    """Strings that break naive code: traversal and absolute paths (the canary file outside
    the data directory among them), NUL, control and bidi characters, huge ones."""
    return [
        "", " ", ".", "..", "../", "../../etc/passwd", "/etc/passwd", "/etc/shadow", "/proc/self/environ",
        str(canary), f"../{canary.parent.name}/{canary.name}", f"../../{canary.parent.name}/{canary.name}",
        f"file://{canary}", "sessions/..", "sessions/../../x", "sessions/a/b", "sessions/", "sessions//x",
        "programs/../sessions/x", "snapshots/%2e%2e", "boardTemplates/../../etc", "/", "//", "\\..\\..\\",
        "\x00", "a\x00b", "sessions/\x00", "\x1b[2J", "\u202eevil", "\ufeff", "ü" * 1000, "\U0001f642" * 200,
        "x" * 65536, "sessions/" + "y" * 65536, "%s%n%x", "' OR 1=1 --", "*", "?", "state=RUNNING",
        "labels.x=y AND state=OFF", "labels.=", "a" * 64, "unicorn", "qemu", "gdbremote", "tcp:127.0.0.1:1",
        "unix:/etc/passwd", "serial:/dev/mem", "lm3s6965evb", "mps2-an385", "sifive_e", "netduinoplus2",
        "{}", "{" * 2000, "[" * 100000, "a: &a [*a, *a]", "!!python/object:os.system ls",
        "R0", "pc", "sp", "main", "hello.c:1", "0x20000000",
    ]


INT_EDGES = [0, 1, -1, 2, 7, 16, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, -(2**31), 2**32 - 1,
             0x20000000, 0x4000C000, 0xE000E000, 0xFFFFFFF0]
INT64_EDGES = [*INT_EDGES, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, -(2**63), 10**18]


def _int_strategy(lo: int, hi: int, edges: Sequence[int]) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(lo, hi))


_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: _int_strategy(-(2**31), 2**31 - 1, INT_EDGES),
    FieldDescriptor.TYPE_SINT32: _int_strategy(-(2**31), 2**31 - 1, INT_EDGES),
    FieldDescriptor.TYPE_SFIXED32: _int_strategy(-(2**31), 2**31 - 1, INT_EDGES),
    FieldDescriptor.TYPE_UINT32: _int_strategy(0, 2**32 - 1, INT_EDGES),
    FieldDescriptor.TYPE_FIXED32: _int_strategy(0, 2**32 - 1, INT_EDGES),
    FieldDescriptor.TYPE_INT64: _int_strategy(-(2**63), 2**63 - 1, INT64_EDGES),
    FieldDescriptor.TYPE_SINT64: _int_strategy(-(2**63), 2**63 - 1, INT64_EDGES),
    FieldDescriptor.TYPE_SFIXED64: _int_strategy(-(2**63), 2**63 - 1, INT64_EDGES),
    FieldDescriptor.TYPE_UINT64: _int_strategy(0, 2**64 - 1, [*INT64_EDGES, 2**64 - 1]),
    FieldDescriptor.TYPE_FIXED64: _int_strategy(0, 2**64 - 1, [*INT64_EDGES, 2**64 - 1]),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_DOUBLE: st.one_of(st.floats(), st.sampled_from([1e308, -1e308, 5e-324, -0.0, 1e-9])),
    FieldDescriptor.TYPE_FLOAT: st.one_of(st.floats(width=32), st.sampled_from([3.4e38, -0.0])),
}


@dataclass
class Pool:
    """What the generated requests draw from: names of resources that exist (refreshed
    from the List RPCs), odd strings, and byte strings (real firmware and snapshots among
    them)."""

    canary: Path
    names: dict[str, list[str]] = field(default_factory=dict)  # kind -> resource names
    blobs: list[bytes] = field(default_factory=list)

    def all_names(self) -> list[str]:
        return sorted({n for names in self.names.values() for n in names}) or ["sessions/none"]

    def kind(self, kind: str) -> list[str]:
        return self.names.get(kind) or self.all_names()

    def strings(self) -> st.SearchStrategy[str]:
        return st.one_of(
            st.text(max_size=24),
            st.sampled_from(self.all_names()),
            st.sampled_from(odd_strings(self.canary)),
            st.sampled_from(FORGED_TOKENS),
            st.builds(lambda n, tail: n + tail, st.sampled_from(self.all_names()),
                      st.sampled_from(["/..", "/../..", "/x", "\x00", "/" + "z" * 300, "%00", "/./"])),
        )

    def bytes_values(self) -> st.SearchStrategy[bytes]:
        chunks = [b"", b"\x00", b"\x7fELF", b":00000001FF\n", b"\x00" * 65536, b"\xff" * 4096,
                  str(self.canary).encode()]
        return st.one_of(st.binary(max_size=64), st.sampled_from(chunks + self.blobs),
                         st.builds(lambda b, n: b[:n], st.sampled_from(self.blobs or [b"x"]), st.integers(0, 4096)))


def _enum_values(f: FieldDescriptor) -> st.SearchStrategy[int]:
    values = [v.number for v in f.enum_type.values]
    return st.one_of(st.sampled_from(values), st.sampled_from([max(values) + 1, 99, -1, 2**31 - 1]))


def _value(f: FieldDescriptor, pool: Pool, depth: int) -> st.SearchStrategy[Any]:
    """One value of a (non-repeated) field."""
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return random_message(f.message_type, pool, depth + 1)
    if f.type == FieldDescriptor.TYPE_ENUM:
        return _enum_values(f)
    if f.type == FieldDescriptor.TYPE_STRING:
        if f.name in ("page_token", "etag"):
            return st.one_of(st.sampled_from(FORGED_TOKENS), pool.strings())
        return pool.strings()
    if f.type == FieldDescriptor.TYPE_BYTES:
        return pool.bytes_values()
    return _SCALARS[f.type]


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _field_strategy(f: FieldDescriptor, pool: Pool, depth: int) -> st.SearchStrategy[Any]:
    """What a field is set to: a value, a list of them (repeated: sometimes hundreds), or
    a dict (maps)."""
    if _is_map(f):
        key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        return st.dictionaries(_value(key_f, pool, depth), _value(value_f, pool, depth), max_size=4)
    if f.is_repeated:
        element = _value(f, pool, depth)
        many = st.lists(element, min_size=100, max_size=300) if f.type != FieldDescriptor.TYPE_MESSAGE \
            else st.lists(element, max_size=6)
        return st.one_of(st.lists(element, max_size=4), many)
    return _value(f, pool, depth)


def set_field(msg: Message, f: FieldDescriptor, value: Any) -> None:
    """Set ``f`` of ``msg`` to what :func:`_field_strategy` drew (an enum value the field
    cannot hold is left out)."""
    msg.ClearField(f.name)
    target = getattr(msg, f.name)
    with contextlib.suppress(ValueError, TypeError):
        if _is_map(f):
            message_value = f.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE
            for k, v in value.items():
                if message_value:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif f.is_repeated:
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                for v in value:
                    target.add().CopyFrom(v)
            else:
                target.extend(value)
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(msg, f.name, value)


MAX_DEPTH = 4


@st.composite
def _random_message(draw: st.DrawFn, desc: Descriptor, pool: Pool, depth: int) -> Message:
    msg = message_class(desc)()
    if depth > MAX_DEPTH:
        return msg
    chosen_oneofs: dict[str, str] = {}
    for oneof in desc.oneofs:
        if oneof.fields and not (len(oneof.fields) == 1 and oneof.name.startswith("_")):
            chosen_oneofs[oneof.name] = draw(st.sampled_from([f.name for f in oneof.fields] + [""]))
    for f in desc.fields:
        oneof = f.containing_oneof
        if oneof is not None and oneof.name in chosen_oneofs:
            if chosen_oneofs[oneof.name] != f.name:
                continue
        elif not draw(st.booleans()):
            continue
        set_field(msg, f, draw(_field_strategy(f, pool, depth)))
    return msg


def random_message(desc: Descriptor, pool: Pool, depth: int = 0) -> st.SearchStrategy[Message]:
    return _random_message(desc, pool, depth)


# ---------------------------------------------------------------------- valid bases


def _name_kind(method: MethodDescriptor) -> str:
    """Which kind of resource a method's ``name`` names."""
    m, service = method.name, method.containing_service.name
    if m in ("RestoreCoSimSnapshot", "DeleteCoSimSnapshot", "ExportCoSimSnapshot"):
        return "cosim_snapshots"
    if service == "CoSimService":
        return "cosims"
    if m in ("GetSnapshot", "DeleteSnapshot", "ExportSnapshot"):
        return "snapshots"
    if m in ("GetProgram", "DeleteProgram"):
        return "programs"
    if "BoardTemplate" in m:
        return "templates"
    if m == "DeleteAlertRule":
        return "alert_rules"
    return "sessions"


def base_requests(method: MethodDescriptor, pool: Pool) -> list[Message]:
    """A valid-looking request (a list of them for a client stream) for ``method``: real
    names in the fields that name things, small sane numbers elsewhere."""
    cls = message_class(method.input_type)
    blobs = pool.blobs
    if method.name == "UploadProgram":
        return [cls(metadata={"display_name": "fuzz"}), cls(chunk=blobs[0] if blobs else b"")]
    if method.name in ("ImportSnapshot", "ImportCoSimSnapshot"):
        return [cls(metadata={}), cls(chunk=blobs[-1] if blobs else b"")]
    if method.name == "Attach":
        return [cls(open={"name": pool.kind("sessions")[0], "control": True}),
                cls(command={"tag": 1, "step": {"count": 1}}),
                cls(command={"tag": 2, "read_registers": {}})]
    msg = cls()
    for f in method.input_type.fields:
        if f.type != FieldDescriptor.TYPE_STRING and f.name not in ("names", "sessions"):
            continue
        repeated = f.is_repeated
        value: Any = None
        if f.name == "name":
            value = pool.kind(_name_kind(method))[0]
        elif f.name == "parent":
            value = pool.kind("cosims")[0]
        elif f.name == "program":
            value = pool.kind("programs")[0]
        elif f.name == "snapshot":
            value = pool.kind("snapshots")[0]
        elif f.name == "board_template":
            value = "lm3s6965evb"
        elif f.name == "names" and repeated and f.type == FieldDescriptor.TYPE_STRING:
            value = pool.kind("sessions")[:2]
        elif f.name == "config":
            value = "name: fuzzboard\nbase: lm3s6965evb\n"
        if value is not None:
            set_field(msg, f, value)
    return [msg]


@st.composite
def mutated_request(draw: st.DrawFn, method: MethodDescriptor, pool: Pool) -> list[Message]:
    """A valid base request with one or two fields (of the first message, or of a nested
    message one level down) replaced by random values."""
    msgs = [m.__deepcopy__() for m in base_requests(method, pool)]
    target = msgs[draw(st.integers(0, len(msgs) - 1))]
    for _ in range(draw(st.integers(1, 2))):
        fields = list(target.DESCRIPTOR.fields)
        if not fields:
            break
        f = draw(st.sampled_from(fields))
        if (f.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(f) and not f.is_repeated
                and f.message_type.fields and draw(st.booleans())):
            inner = getattr(target, f.name)
            sub = draw(st.sampled_from(list(f.message_type.fields)))
            set_field(inner, sub, draw(_field_strategy(sub, pool, 1)))
        else:
            set_field(target, f, draw(_field_strategy(f, pool, 0)))
    return msgs


@st.composite
def random_request(draw: st.DrawFn, method: MethodDescriptor, pool: Pool) -> list[Message]:
    """Fully random requests (1-3 of them for a client stream)."""
    count = draw(st.integers(1, 3)) if method.client_streaming else 1
    return [draw(random_message(method.input_type, pool)) for _ in range(count)]


# ---------------------------------------------------------------------- the server


@dataclass
class Outcome:
    code: grpc.StatusCode
    message: str
    answers: list[bytes]  # the serialised responses received


class FuzzServer:
    """A server on its own event loop thread in this process, and a sync channel to it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self.running: RunningServer | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> FuzzServer:
        self.thread.start()
        # workers=0: every machine in this process, so the file audit sees all of it
        cfg = ServerConfig(listen="127.0.0.1:0", data_dir=self.data_dir, log_level="error", workers=0,
                           job_engine="local")  # jobs: the manager is the subject, not Ray
        self.running = asyncio.run_coroutine_threadsafe(start(cfg), self.loop).result(60)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}", options=CLIENT_OPTIONS)
        return self

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.stop(0.5), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def alive(self) -> bool:
        """The server thread runs and answers a health check within 10 s."""
        if not self.thread.is_alive() or self.channel is None:
            return False
        try:
            answer = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def call(self, method: MethodDescriptor, requests: Sequence[Message]) -> Outcome:
        assert self.channel is not None
        path = method_path(method)
        ser = message_class(method.input_type).SerializeToString
        answers: list[bytes] = []
        raw = self.channel
        try:
            if not method.server_streaming:
                if method.client_streaming:
                    unary = raw.stream_unary(path, request_serializer=ser, response_deserializer=None)
                    answers.append(unary(iter(requests), timeout=UNARY_DEADLINE_S))
                else:
                    call = raw.unary_unary(path, request_serializer=ser, response_deserializer=None)
                    answers.append(call(requests[0], timeout=UNARY_DEADLINE_S))
                return Outcome(grpc.StatusCode.OK, "", answers)
            if method.client_streaming:
                stream = raw.stream_stream(path, request_serializer=ser, response_deserializer=None)(
                    iter(requests), timeout=STREAM_DEADLINE_S * 2)
            else:
                stream = raw.unary_stream(path, request_serializer=ser, response_deserializer=None)(
                    requests[0], timeout=STREAM_DEADLINE_S)
            for answer in stream:
                answers.append(answer)
                if len(answers) >= STREAM_MESSAGES:
                    stream.cancel()
                    return Outcome(grpc.StatusCode.OK, "read enough, cancelled", answers)
            return Outcome(grpc.StatusCode.OK, "", answers)
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details() or "", answers)  # type: ignore[attr-defined]

    def refresh_pool(self, pool: Pool) -> None:
        """The names of what exists now, from the List RPCs (and each co-simulation's snapshots)."""
        from machineserver.v1 import capabilities_pb2, cosim_pb2, coverage_pb2, session_pb2, telemetry_pb2

        assert self.channel is not None
        lists: list[tuple[str, str, Any, Any]] = [
            ("sessions", "/machineserver.v1.SessionService/ListSessions", session_pb2.ListSessionsRequest, session_pb2.ListSessionsResponse),
            ("programs", "/machineserver.v1.SessionService/ListPrograms", session_pb2.ListProgramsRequest, session_pb2.ListProgramsResponse),
            ("snapshots", "/machineserver.v1.SessionService/ListSnapshots", session_pb2.ListSnapshotsRequest, session_pb2.ListSnapshotsResponse),
            ("templates", "/machineserver.v1.CapabilitiesService/ListBoardTemplates",
             capabilities_pb2.ListBoardTemplatesRequest, capabilities_pb2.ListBoardTemplatesResponse),
            ("cosims", "/machineserver.v1.CoSimService/ListCoSimulations", cosim_pb2.ListCoSimulationsRequest, cosim_pb2.ListCoSimulationsResponse),
            ("reports", "/machineserver.v1.CoverageService/ListCoverageReports",
             coverage_pb2.ListCoverageReportsRequest, coverage_pb2.ListCoverageReportsResponse),
            ("alert_rules", "/machineserver.v1.TelemetryService/ListAlertRules", telemetry_pb2.ListAlertRulesRequest, telemetry_pb2.ListAlertRulesResponse),
        ]
        for kind, path, req, resp in lists:
            call = self.channel.unary_unary(path, request_serializer=req.SerializeToString,
                                            response_deserializer=resp.FromString)
            answer = call(req(page_size=50), timeout=20)
            listed = [f for f in answer.DESCRIPTOR.fields if f.is_repeated]
            items = getattr(answer, listed[0].name) if listed else []
            pool.names[kind] = [item.name for item in items if item.name][:12]
        cosim_snaps: list[str] = []
        for parent in pool.names.get("cosims", [])[:3]:
            call = self.channel.unary_unary("/machineserver.v1.CoSimService/ListCoSimSnapshots",
                                            request_serializer=cosim_pb2.ListCoSimSnapshotsRequest.SerializeToString,
                                            response_deserializer=cosim_pb2.ListCoSimSnapshotsResponse.FromString)
            cosim_snaps += [s.name for s in call(cosim_pb2.ListCoSimSnapshotsRequest(parent=parent), timeout=20).snapshots]
        pool.names["cosim_snapshots"] = cosim_snaps[:6]


# ---------------------------------------------------------------------- the file audit


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_WRITES = {"os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.chown", "os.utime",
                "shutil.rmtree", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr"}
_TWO_PATH_WRITES = {"os.rename", "os.replace", "os.link", "os.symlink", "shutil.copyfile", "shutil.move",
                    "shutil.copytree"}
_PATH_READS = {"os.listdir", "os.scandir", "glob.glob", "sqlite3.connect", "os.exec", "os.posix_spawn"}


@dataclass
class FileAudit:
    """Every path the process reads outside ``read_roots`` or writes outside
    ``write_roots`` while :attr:`armed`, from Python's audit events (open, os.*, shutil.*,
    sqlite3.connect, subprocess.Popen: every file the server's Python code or its SQLite
    touches by name, and every command it runs). Installed once per process (an audit hook
    cannot be removed); it costs a check of a flag while disarmed."""

    read_roots: tuple[Path, ...]
    write_roots: tuple[Path, ...]
    armed: bool = False
    violations: list[str] = field(default_factory=list)
    commands: Counter[str] = field(default_factory=Counter)
    seen_canary: bool = False
    canary: str = ""

    def install(self) -> FileAudit:
        sys.addaudithook(self._hook)
        return self

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        self.armed = True
        try:
            yield
        finally:
            self.armed = False

    @staticmethod
    def _under(path: str, roots: tuple[Path, ...]) -> bool:
        resolved = os.path.realpath(path)
        return any(resolved == str(r) or resolved.startswith(str(r) + os.sep) for r in roots)

    def _check(self, event: str, raw: object, write: bool) -> None:
        if isinstance(raw, bytes):
            raw = raw.decode(errors="replace")
        if not isinstance(raw, str | os.PathLike) or raw in ("", ":memory:"):
            return
        path = os.fspath(raw)
        if not isinstance(path, str):
            return
        if self.canary and os.path.realpath(path) == self.canary:
            self.seen_canary = True
        ok = self._under(path, self.write_roots) if write else self._under(path, self.read_roots + self.write_roots)
        if not ok:
            self.violations.append(f"{event} {'write' if write else 'read'} {path!r}")

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.armed:
            return
        try:
            if event == "open":
                path, mode, flags = (*args, None, None, None)[:3]
                write = any(c in str(mode or "") for c in "wax+") or (
                    mode is None and isinstance(flags, int) and bool(flags & _WRITE_FLAGS))
                self._check(event, path, write)
            elif event in _PATH_WRITES:
                self._check(event, args[0], True)
            elif event in _TWO_PATH_WRITES:
                self._check(event, args[0], event not in ("shutil.copyfile", "shutil.copytree"))
                self._check(event, args[1], True)
            elif event in _PATH_READS:
                self._check(event, args[0], False)
            elif event == "subprocess.Popen":
                argv = args[1] if isinstance(args[1], list | tuple) else [args[0]]
                self.commands[os.path.basename(str(argv[0]))] += 1
                for arg in argv[1:]:
                    text = os.fspath(arg) if isinstance(arg, str | os.PathLike) else ""
                    if isinstance(text, str) and ("passwd" in text or (self.canary and self.canary in text)):
                        self.violations.append(f"subprocess {argv!r} names {text!r}")
        except Exception as exc:  # an audit hook must never break the call it watches
            self.violations.append(f"audit hook failed on {event}: {exc!r}")


def default_read_roots() -> tuple[Path, ...]:
    """What a server may read besides its data directory: its own code and the packages
    it runs on, the kernel's views (/proc, /sys, /dev) and shared system data."""
    import machineserver.sdk
    import machineserver.server
    import machineserver.v1

    code = {Path(m.__file__ or ".").parent for m in (machineserver.server, machineserver.sdk, machineserver.v1)}
    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix), *code, ROOT / ".venv",
             ROOT / "tests" / "firmware", Path("/proc"), Path("/sys"),
             Path("/dev"), Path("/usr/lib"), Path("/usr/share/zoneinfo"), Path("/usr/share/qemu"),
             Path("/usr/bin"), Path("/etc/localtime")}
    return tuple(Path(os.path.realpath(r)) for r in roots)


def timed(fn: Callable[[], Outcome]) -> tuple[Outcome, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t

"""Every RPC as a command, built from the proto descriptors: ``msctl GROUP RPC-NAME``
with flags from the request's fields (JSON in, JSON out)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator, Set
from pathlib import Path
from typing import IO

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from machineserver.cli import output
from machineserver.sdk import Client, errors
from machineserver.sdk.client import service_descriptors

# service -> CLI group
GROUPS = {
    "CapabilitiesService": "capabilities",
    "SessionService": "session",
    "DebugService": "debug",
    "CoverageService": "coverage",
    "CoSimService": "cosim",
    "TelemetryService": "telemetry",
    "AccessService": "access",
    "AuditService": "audit",
    "JobService": "job",
    "CapsuleService": "capsule",
}
# service -> SDK client attribute
CLIENT_ATTRS = {
    "CapabilitiesService": "capabilities",
    "SessionService": "sessions",
    "DebugService": "debug",
    "CoverageService": "coverage",
    "CoSimService": "cosim",
    "TelemetryService": "telemetry",
    "AccessService": "access",
    "AuditService": "audit",
    "JobService": "jobs",
    "CapsuleService": "capsules",
}
CHUNK = 64 * 1024


class UsageError(Exception):
    """A mistake in what the user gave msctl (a flag's JSON, a file): one line, exit 2."""


def kebab(name: str) -> str:
    s = re.sub(r"(?<=[a-z0-9])([A-Z])", r"-\1", name)
    return re.sub(r"(?<=[A-Z])([A-Z][a-z])", r"-\1", s).lower()


def _message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None
    return field.message_type


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _enum_value(field: FieldDescriptor, text: str) -> int:
    enum = field.enum_type
    assert enum is not None
    text = text.upper()
    for v in enum.values:
        prefix = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", enum.name).upper() + "_"
        if v.name == text or v.name == prefix + text:
            return int(v.number)
    try:
        return int(text)
    except ValueError:
        names = ", ".join(v.name for v in enum.values)
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {names}") from None


def _scalar_type(field: FieldDescriptor) -> Callable[[str], object]:
    """The argparse ``type=`` of a scalar field's flag: text to the field's value."""
    t = field.type
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
             FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
             FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64):
        return lambda s: int(s, 0)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return float
    if t == FieldDescriptor.TYPE_ENUM:
        return lambda s: _enum_value(field, s)
    if t == FieldDescriptor.TYPE_BYTES:
        return _bytes_arg
    return str


def _bytes_arg(text: str) -> bytes:
    """Bytes from "@path" (a file), "hex:0a0b", or the text itself (UTF-8)."""
    if text.startswith("@"):
        try:
            return Path(text[1:]).read_bytes()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]!r}: {exc.strerror or exc}") from None
    if text.startswith("hex:"):
        return bytes.fromhex(text[4:])
    return text.encode()


def add_request_flags(parser: argparse.ArgumentParser, desc: Descriptor, skip: Set[str] = frozenset()) -> None:
    """Flags for a request's fields: scalars typed, repeated appended, maps as K=V,
    messages as JSON; a ``name`` field is also the first positional argument."""
    for field in desc.fields:
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        dest = f"f_{field.name}"
        is_map = _is_map(field)
        repeated = field.is_repeated
        if is_map:
            parser.add_argument(flag, dest=dest, action="append", metavar="KEY=VALUE", help=f"{field.name} entry")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            parser.add_argument(flag, dest=dest, metavar="JSON", action="append" if repeated else "store",
                                help=f"{_message_type(field).name} as JSON")
        elif field.type == FieldDescriptor.TYPE_BOOL and not repeated:
            parser.add_argument(flag, dest=dest, action="store_true", default=None)
        else:
            metavar = field.enum_type.name if field.enum_type is not None else field.name.upper()
            parser.add_argument(flag, dest=dest, type=_scalar_type(field), metavar=metavar,
                                action="append" if repeated else "store")
    if "name" in desc.fields_by_name and "name" not in skip:
        parser.add_argument("pos_name", nargs="?", metavar="NAME", help="the resource name (same as --name)")
    parser.add_argument("--request-json", dest="request_json", metavar="JSON",
                        help="the whole request as JSON (flags override its fields)")


def _unknown_field(value: object, desc: Descriptor, path: str = "") -> str | None:
    """The first key of parsed JSON ``value`` that is no field of ``desc`` (nested
    messages included), said in one line; None when every key is a field."""
    if not isinstance(value, dict) or desc.full_name.startswith("google.protobuf."):
        return None  # well-known types have JSON forms of their own
    fields = {f.json_name: f for f in desc.fields} | {f.name: f for f in desc.fields}
    for key, item in value.items():
        field = fields.get(key)
        if field is None:
            known = ", ".join(f.name for f in desc.fields)
            return f"unknown field {path + key!r} in {desc.name} (its fields: {known})"
        if field.message_type is not None and not _is_map(field):
            for sub in item if field.is_repeated and isinstance(item, list) else [item]:
                if (found := _unknown_field(sub, field.message_type, f"{path}{key}.")) is not None:
                    return found
    return None


def parse_json(text: str, msg: Message, desc: Descriptor, flag: str) -> None:
    """Parse flag ``flag``'s JSON ``text`` into ``msg`` (of type ``desc``); a UsageError naming the flag and
    the problem (not JSON, an unknown field, a value of the wrong kind) otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag}: not valid JSON ({exc})") from None
    if (unknown := _unknown_field(value, desc)) is not None:
        raise UsageError(f"{flag}: {unknown}")
    try:
        json_format.ParseDict(value, msg)
    except json_format.ParseError as exc:
        raise UsageError(f"{flag}: {str(exc).splitlines()[0]}") from None


def build_request(desc: Descriptor, args: argparse.Namespace) -> Message:
    msg = GetMessageClass(desc)()
    if getattr(args, "request_json", None):
        parse_json(args.request_json, msg, desc, "--request-json")
    for field in desc.fields:
        value = getattr(args, f"f_{field.name}", None)
        if field.name == "name" and value is None:
            value = getattr(args, "pos_name", None)
        if value is None:
            continue
        if _is_map(field):
            target = getattr(msg, field.name)
            for item in value:
                key, sep, val = item.partition("=")
                if not sep:
                    raise SystemExit(f"msctl: --{field.name.replace('_', '-')} wants KEY=VALUE, got {item!r}")
                target[key] = val
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            flag = "--" + field.name.replace("_", "-")
            if isinstance(value, list):
                for v in value:
                    parse_json(v, getattr(msg, field.name).add(), _message_type(field), flag)
            else:
                parse_json(value, getattr(msg, field.name), _message_type(field), flag)
        elif field.is_repeated:
            getattr(msg, field.name).extend(value)
        else:
            setattr(msg, field.name, value)
    return msg


def print_message(msg: Message, as_json: bool) -> None:
    text = json_format.MessageToJson(msg, indent=None if as_json else 2, preserving_proto_field_name=True)
    print(text, flush=True)


def add_stream_flags(parser: argparse.ArgumentParser) -> None:
    """``--count N`` and ``--timeout S`` for a command that prints a server stream."""
    parser.add_argument("--count", dest="stream_count", type=int, metavar="N",
                        help="stop after N messages")
    parser.add_argument("--timeout", dest="stream_timeout", type=float, metavar="SECONDS",
                        help="stop after this many seconds (a normal end, exit 0)")


def _upload_requests(method: MethodDescriptor, args: argparse.Namespace, file: IO[bytes]) -> Iterator[Message]:
    """Client streams of metadata + chunks (UploadProgram, ImportSnapshot) from --file,
    opened by the caller (so a missing file is an error before the call starts)."""
    req_cls = GetMessageClass(method.input_type)
    meta_field = method.input_type.fields_by_name["metadata"]
    meta = build_request(_message_type(meta_field), args)
    yield req_cls(metadata=meta)
    while chunk := file.read(CHUNK):
        yield req_cls(chunk=chunk)


class JsonLines:
    """A bidirectional stream's requests as JSON lines on stdin. A bad line ends the
    requests; gRPC then cancels the call, and ``mistake`` says what was wrong with it."""

    def __init__(self, method: MethodDescriptor) -> None:
        self._desc = method.input_type
        self._cls = GetMessageClass(method.input_type)
        self.mistake: UsageError | None = None

    def __iter__(self) -> Iterator[Message]:
        for number, line in enumerate(sys.stdin, 1):
            if line.strip():
                msg = self._cls()
                try:
                    parse_json(line, msg, self._desc, f"stdin line {number}")
                except UsageError as exc:
                    self.mistake = exc
                    raise
                yield msg


def add_rpc_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for svc in service_descriptors():
        group = subparsers.add_parser(GROUPS[svc.name], help=f"{svc.full_name} RPCs and verbs")
        group.set_defaults(group_parser=group)
        gsub = group.add_subparsers(dest="command", metavar="COMMAND")
        for method in svc.methods:
            _add_method(gsub, svc, method)


def _add_method(gsub: argparse._SubParsersAction[argparse.ArgumentParser], svc: ServiceDescriptor,
                method: MethodDescriptor) -> None:
    kind = ("stream " if method.client_streaming else "") + "-> " + ("stream" if method.server_streaming else "unary")
    p = gsub.add_parser(kebab(method.name), help=f"{method.name} ({kind})")
    if method.client_streaming and "metadata" in method.input_type.fields_by_name:
        p.add_argument("--file", required=True, help="the file to send in chunks")
        add_request_flags(p, _message_type(method.input_type.fields_by_name["metadata"]))
    elif not method.client_streaming:
        add_request_flags(p, method.input_type)
    if method.server_streaming:
        add_stream_flags(p)
    p.set_defaults(handler=lambda client, args: run_rpc(client, svc, method, args))


# an SDK wrapper looked up by RPC name: a request (or a stream of them) in, a response
# (or a stream of them) out; keyword ``timeout`` is the call's deadline
RpcWrapper = Callable[..., Message | Iterator[Message]]


def run_rpc(client: Client, svc: ServiceDescriptor, method: MethodDescriptor, args: argparse.Namespace) -> int:
    stub = getattr(client, CLIENT_ATTRS[svc.name])
    call: RpcWrapper = getattr(stub, stub.METHODS[method.name])
    if method.client_streaming and "metadata" in method.input_type.fields_by_name:
        with Path(args.file).open("rb") as file:
            _print_result(call(_upload_requests(method, args, file)), args)
    elif method.client_streaming:
        lines = JsonLines(method)
        try:
            _print_result(call(iter(lines)), args)
        except errors.MachineServerError:
            if lines.mistake is not None:  # the call failed because a line was wrong
                raise lines.mistake from None
            raise
    elif getattr(args, "stream_timeout", None) is not None:
        _print_result(call(build_request(method.input_type, args), timeout=args.stream_timeout), args)
    else:
        _print_result(call(build_request(method.input_type, args)), args)
    return 0


def _print_result(result: Message | Iterator[Message], args: argparse.Namespace) -> None:
    if isinstance(result, Message):
        output.emit(result, args)
    else:  # a server stream
        output.emit_stream(result, args)

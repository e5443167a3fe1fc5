"""Every RPC as a command, built from the proto descriptors: ``msctl GROUP RPC-NAME``
with flags from the request's fields (JSON in, JSON out)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator, Set
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from machineserver.sdk import Client
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
        return Path(text[1:]).read_bytes()
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


def build_request(desc: Descriptor, args: argparse.Namespace) -> Message:
    msg = GetMessageClass(desc)()
    if getattr(args, "request_json", None):
        json_format.Parse(args.request_json, msg)
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
            if isinstance(value, list):
                for v in value:
                    json_format.Parse(v, getattr(msg, field.name).add())
            else:
                json_format.Parse(value, getattr(msg, field.name))
        elif field.is_repeated:
            getattr(msg, field.name).extend(value)
        else:
            setattr(msg, field.name, value)
    return msg


def print_message(msg: Message, as_json: bool) -> None:
    text = json_format.MessageToJson(msg, indent=None if as_json else 2, preserving_proto_field_name=True)
    print(text, flush=True)


def _upload_requests(method: MethodDescriptor, args: argparse.Namespace) -> Iterator[Message]:
    """Client streams of metadata + chunks (UploadProgram, ImportSnapshot) from --file."""
    req_cls = GetMessageClass(method.input_type)
    meta_field = method.input_type.fields_by_name["metadata"]
    meta = build_request(_message_type(meta_field), args)
    yield req_cls(metadata=meta)
    path = Path(args.file)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield req_cls(chunk=chunk)


def _json_lines(method: MethodDescriptor) -> Iterator[Message]:
    """A bidirectional stream's requests as JSON lines on stdin."""
    cls = GetMessageClass(method.input_type)
    for line in sys.stdin:
        if line.strip():
            yield json_format.Parse(line, cls())


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
    p.set_defaults(handler=lambda client, args: run_rpc(client, svc, method, args))


# an SDK wrapper looked up by RPC name: a request (or a stream of them) in, a response
# (or a stream of them) out
RpcWrapper = Callable[[Message | Iterator[Message]], Message | Iterator[Message]]


def run_rpc(client: Client, svc: ServiceDescriptor, method: MethodDescriptor, args: argparse.Namespace) -> int:
    stub = getattr(client, CLIENT_ATTRS[svc.name])
    call: RpcWrapper = getattr(stub, stub.METHODS[method.name])
    if method.client_streaming:
        requests = _upload_requests(method, args) if "metadata" in method.input_type.fields_by_name else _json_lines(method)
        result = call(requests)
    else:
        result = call(build_request(method.input_type, args))
    if isinstance(result, Message):
        print_message(result, args.json)
    else:  # a server stream
        for msg in result:
            print_message(msg, True)
    return 0

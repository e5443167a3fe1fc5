"""Writes sdk/machineserver/sdk/_services.py: a typed wrapper method for every RPC of
every machineserver.v1 service, async and sync, from the generated descriptors, and for
each request the keyword fields it takes as a TypedDict (``**fields: Unpack[...]``), so
that ``client.sessions.get_session(nam=...)`` is a type error, not only a runtime one.
Run by scripts/gen-protos; the output is committed and drift-checked like the stubs."""

from __future__ import annotations

import importlib
import keyword
import re
import sys
from pathlib import Path

from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)

MODULES = ["capabilities", "session", "debug", "coverage", "cosim", "telemetry", "access", "audit", "job", "capsule"]
PACKAGE = "machineserver.v1"
# attribute name on the client for each service
ATTRS = {
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
# keyword-only options every wrapper takes: a request field of the same name could not be
# passed as a keyword field
OPTION_NAMES = frozenset({"timeout", "metadata"})
# well-known types whose JSON form is a string ("1.5s", "2024-01-01T00:00:00Z", "a,b"):
# json_format parses that string into the message
JSON_STRING_TYPES = frozenset({"google.protobuf.Duration", "google.protobuf.Timestamp", "google.protobuf.FieldMask"})
SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: "float", FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int", FieldDescriptor.TYPE_UINT64: "int", FieldDescriptor.TYPE_INT32: "int",
    FieldDescriptor.TYPE_FIXED64: "int", FieldDescriptor.TYPE_FIXED32: "int", FieldDescriptor.TYPE_UINT32: "int",
    FieldDescriptor.TYPE_SFIXED32: "int", FieldDescriptor.TYPE_SFIXED64: "int", FieldDescriptor.TYPE_SINT32: "int",
    FieldDescriptor.TYPE_SINT64: "int", FieldDescriptor.TYPE_BOOL: "bool", FieldDescriptor.TYPE_STRING: "str",
    FieldDescriptor.TYPE_BYTES: "bytes",
}


def snake(name: str) -> str:
    """CreateSession -> create_session; a Python keyword gets a trailing underscore."""
    s = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name)
    s = re.sub(r"(?<=[A-Z])([A-Z][a-z])", r"_\1", s).lower()
    return s + "_" if keyword.iskeyword(s) else s


class Imports:
    """The generated modules the output refers to, imported once each."""

    def __init__(self) -> None:
        self.modules: set[tuple[str, str]] = set()  # (package, module)

    def qualified(self, desc: Descriptor | EnumDescriptor) -> str:
        """The Python name of a message or enum: session_pb2.Session, common_pb2.Outer.Inner."""
        file = desc.file
        module = file.name.rsplit("/", 1)[-1].removesuffix(".proto") + "_pb2"
        self.modules.add((file.package, module))
        package_prefix = file.package + "." if file.package else ""
        return f"{module}.{desc.full_name.removeprefix(package_prefix)}"

    def third_party(self) -> list[str]:
        """Imports of other packages' generated modules (google.protobuf's well-known types)."""
        packages = sorted({pkg for pkg, _ in self.modules if pkg != PACKAGE})
        return [f"from {pkg} import {', '.join(sorted(m for p, m in self.modules if p == pkg))}" for pkg in packages]

    def ours(self) -> list[str]:
        return [f"from {PACKAGE} import {m}" for m in sorted(m for p, m in self.modules if p == PACKAGE)]


def value_type(field: FieldDescriptor, imports: Imports) -> str:
    """What one value of the field may be given as (what _transport._set_field takes)."""
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return f"{imports.qualified(field.enum_type)}.ValueType | str"  # a value or its name
    if field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        assert field.message_type is not None
        msg = field.message_type
        forms = [imports.qualified(msg), "Mapping[str, object]"]  # a message, or its JSON shape
        if msg.full_name in JSON_STRING_TYPES:
            forms.append("str")
        return " | ".join(forms)
    return SCALARS[field.type]


def field_type(field: FieldDescriptor, imports: Imports) -> str:
    msg = field.message_type
    if msg is not None and msg.GetOptions().map_entry:
        key, value = msg.fields_by_name["key"], msg.fields_by_name["value"]
        return f"Mapping[{value_type(key, imports)}, {value_type(value, imports)}]"
    if field.is_repeated:
        return f"Iterable[{value_type(field, imports)}]"
    return value_type(field, imports)


def fields_class(desc: Descriptor) -> str:
    return desc.name.removesuffix("Request") + "Fields"


def typed_dict(desc: Descriptor, imports: Imports) -> list[str]:
    """A TypedDict of the request's fields, every key optional (an unset field keeps its
    default)."""
    name = fields_class(desc)
    items = [(f.name, field_type(f, imports)) for f in desc.fields]
    for field_name, _ in items:
        if field_name in OPTION_NAMES or keyword.iskeyword(field_name):
            raise SystemExit(f"gen_sdk: {desc.full_name}.{field_name} cannot be a keyword field of a wrapper")
    lines = ["", "", f"class {name}(TypedDict, total=False):", f'    """Keyword fields of {desc.full_name}."""']
    if items:
        lines.append("")
    lines += [f"    {field_name}: {annotation}" for field_name, annotation in items]
    return lines


def wrapper(flavour: str, service: ServiceDescriptor, method: MethodDescriptor, imports: Imports) -> list[str]:
    req, resp = imports.qualified(method.input_type), imports.qualified(method.output_type)
    path = f"/{service.full_name}/{method.name}"
    name = snake(method.name)
    is_async = flavour == "async"
    opts = "timeout: Timeout = DEFAULT, metadata: Iterable[tuple[str, MetadataValue]] = ()"
    if method.server_streaming:
        returns = f"AsyncGenerator[{resp}, None]" if is_async else f"Generator[{resp}, None, None]"
        define, call = "def", "return "
    else:
        returns = resp
        define, call = ("async def", "return await ") if is_async else ("def", "return ")
    if not method.client_streaming:
        sig = f"self, request: {req} | None = None, /, *, {opts}, **fields: Unpack[{fields_class(method.input_type)}]"
        body = f"self._t.build(request, fields, {req}), {resp}, timeout, metadata"
        kind = "server_stream" if method.server_streaming else "unary"
    else:
        reqs = f"AsyncIterable[{req}] | Iterable[{req}]" if is_async else f"Iterable[{req}]"
        sig = f"self, requests: {reqs}, /, *, {opts}"
        body = f"requests, {req}, {resp}, timeout, metadata"
        kind = "bidi_stream" if method.server_streaming else "client_stream"
    return ["", f"    {define} {name}({sig}) -> {returns}:",
            f"        {call}self._t.{kind}({path!r}, {body})"]


def main(out_path: str) -> None:
    services: list[ServiceDescriptor] = []
    for mod in MODULES:
        pb2 = importlib.import_module(f"{PACKAGE}.{mod}_pb2")
        services += pb2.DESCRIPTOR.services_by_name.values()
    imports = Imports()
    for mod in MODULES:
        imports.modules.add((PACKAGE, f"{mod}_pb2"))

    requests: dict[str, Descriptor] = {}
    for service in services:
        for method in service.methods:
            if not method.client_streaming:
                requests.setdefault(method.input_type.full_name, method.input_type)
    body: list[str] = ["", "", "# ---------------------------------------------------------------- keyword fields"]
    for desc in requests.values():
        body += typed_dict(desc, imports)

    for flavour in ("async", "sync"):
        body += ["", "", f"# ---------------------------------------------------------------- {flavour} services"]
        for service in services:
            cls = ("Async" if flavour == "async" else "") + service.name
            transport = "AsyncTransport" if flavour == "async" else "SyncTransport"
            methods = ", ".join(f"{m.name!r}: {snake(m.name)!r}" for m in service.methods)
            body += ["", "", f"class {cls}:", f'    """{service.full_name}."""', "",
                     f"    SERVICE = {service.full_name!r}",
                     "    # RPC name -> method name",
                     f"    METHODS = {{{methods}}}", "",
                     f"    def __init__(self, transport: {transport}) -> None:",
                     "        self._t = transport"]
            for method in service.methods:
                body += wrapper(flavour, service, method, imports)
    body += ["", "", "# client attribute -> (async class, sync class)", "SERVICES = {"]
    for service in services:
        body.append(f"    {ATTRS[service.name]!r}: (Async{service.name}, {service.name}),")
    body += ["}", ""]

    head = [
        "# Generated by scripts/gen-protos (scripts/lib/gen_sdk.py). DO NOT EDIT.",
        '"""Typed wrappers for every RPC: one class per service, async and sync, and the',
        'keyword fields of each request as a TypedDict."""',
        "",
        "from __future__ import annotations",
        "",
        "from collections.abc import AsyncGenerator, AsyncIterable, Generator, Iterable, Mapping",
        "from typing import TypedDict, Unpack",
        "",
        *imports.third_party(),
        "",
        "from machineserver.sdk._transport import DEFAULT, AsyncTransport, MetadataValue, SyncTransport, Timeout",
        *imports.ours(),
    ]
    Path(out_path).write_text("\n".join(head + body))


if __name__ == "__main__":
    main(sys.argv[1])

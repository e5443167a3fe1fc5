"""Size limits on everything a client sends, checked on every incoming message (unary
requests and each message of a client stream) before any handler sees it, so nothing
oversized is ever stored (and no list of records can grow past the message limit).

The limits come from the messages' descriptors: every string, bytes, repeated and map
field has one, the kind's default unless :data:`FIELD_LIMITS` names the field. A field
over its limit is INVALID_ARGUMENT naming the field (its path in the request, e.g.
``options.remote.address``, ``labels["team"]``, ``names[3]``) and the limit. The upload
chunks (:data:`UNCHECKED`) are left to the byte limits of the uploads themselves.

The check is cheap: what to check is worked out once per message type (:class:`Plan`),
and a message whose whole encoding is no longer than the smallest limit it could break
is not looked at field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from machineserver.server.core.errors import InvalidArgument

KiB = 1 << 10
MiB = 1 << 20

DEFAULT_STRING_BYTES = 4 * KiB
DEFAULT_BYTES_BYTES = 1 * MiB
DEFAULT_REPEATED_COUNT = 1024
DEFAULT_MAP_ENTRIES = 64
DEFAULT_MAP_KEY_BYTES = 256


@dataclass(frozen=True)
class Limit:
    """A field's limit: bytes of each string/bytes value (UTF-8 for strings), elements of
    a repeated field or entries of a map, and bytes of a map's keys."""

    bytes: int = 0  # 0: the kind's default
    count: int = 0
    key_bytes: int = 0
    note: str = ""  # what the field holds, for the documented table


NAME = 256  # resource names and ids (sessions/ID, programs/ID, ...)

# by field name, in every request of every service (the documented table: README, "Size limits")
FIELD_LIMITS: dict[str, Limit] = {
    "name": Limit(NAME, note="resource names (sessions/ID, ...)"),
    "parent": Limit(NAME, note="parent resource name"),
    "session": Limit(NAME, note="session names"),
    "session_id": Limit(NAME, note="a chosen session id"),
    "program": Limit(NAME, note="program names"),
    "snapshot": Limit(NAME, note="snapshot names"),
    "board_template": Limit(NAME, note="board template names"),
    "board": Limit(NAME, note="board names"),
    "backend": Limit(NAME, note="backend names"),
    "tenant": Limit(NAME, note="tenant names"),
    "from_session": Limit(NAME, note="co-simulation link ends"),
    "to_session": Limit(NAME, note="co-simulation link ends"),
    "session_a": Limit(NAME, note="co-simulation link ends"),
    "session_b": Limit(NAME, note="co-simulation link ends"),
    "metric": Limit(NAME, note="alert rule metric"),
    "register": Limit(64, note="register name"),
    "etag": Limit(NAME, note="etags"),
    "sha256": Limit(128, note="content hashes (hex)"),
    "display_name": Limit(256, note="display names"),
    "labels": Limit(256, count=64, key_bytes=63, note="labels: 64 entries, keys 63 B, values 256 B"),
    "filter": Limit(1 * KiB, note="List filters"),
    "page_token": Limit(1 * KiB, note="page tokens"),
    "description": Limit(16 * KiB, note="descriptions"),
    "board_config": Limit(256 * KiB, note="inline board YAML/JSON"),
    "config": Limit(256 * KiB, note="board template YAML/JSON"),
    "symbol": Limit(1 * KiB, note="symbol names"),
    "file_line": Limit(1 * KiB, note="FILE:LINE locations"),
    "bind_address": Limit(NAME, note="GDB bridge bind address"),
    "names": Limit(NAME, count=256, note="lists of names (registers, reports): 256 x 256 B"),
    "sessions": Limit(NAME, count=64, note="co-simulation members: 64 x 256 B"),
    "links": Limit(count=256, note="co-simulation links: 256"),
    "mappings": Limit(count=64, note="shared-memory mappings per link: 64"),
    "paths": Limit(NAME, count=16, note="update_mask paths: 16 x 256 B"),
    "data": Limit(1 * MiB, note="memory/console data per call (console: 64 KiB, checked by the core)"),
}

# bytes of uploads and bundles: their own byte limits (program, snapshot, source bundle sizes)
UNCHECKED = frozenset({"chunk", "sources_chunk", "sources"})

_STRING, _BYTES = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES


def _utf8_len(text: str, limit: int) -> int:
    """``text``'s UTF-8 length, or a number over ``limit`` as soon as that is certain."""
    n = len(text)
    if n > limit or n * 4 <= limit or text.isascii():
        return n
    return len(text.encode("utf-8", "surrogatepass"))


def _over(path: str, what: str, got: int, limit: int) -> InvalidArgument:
    return InvalidArgument(path, f"at most {limit} {what} (got {got}); see the size limits in the README")


def _show_key(key: object) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Plan:
    """What to check in one message type (built once per type, see :func:`plan_for`)."""

    strings: list[tuple[str, int]] = field(default_factory=list)  # (field, max bytes)
    blobs: list[tuple[str, int]] = field(default_factory=list)
    repeated_strings: list[tuple[str, int, int, bool]] = field(default_factory=list)  # field, count, bytes, is str
    repeated_scalars: list[tuple[str, int]] = field(default_factory=list)
    maps: list[tuple[str, int, int, int, Plan | None]] = field(default_factory=list)  # entries, key, value, plan
    messages: list[tuple[str, Plan]] = field(default_factory=list)
    repeated_messages: list[tuple[str, int, Plan]] = field(default_factory=list)
    floor: int = 1 << 62  # the smallest limit here or below: a message no larger breaks none

    def check(self, msg: Any, prefix: str = "") -> None:
        for name, limit in self.strings:
            value = getattr(msg, name)
            if len(value) * 4 > limit and (n := _utf8_len(value, limit)) > limit:
                raise _over(prefix + name, "bytes", n, limit)
        for name, limit in self.blobs:
            if (n := len(getattr(msg, name))) > limit:
                raise _over(prefix + name, "bytes", n, limit)
        for name, count, limit, is_text in self.repeated_strings:
            values = getattr(msg, name)
            if len(values) > count:
                raise _over(prefix + name, "elements", len(values), count)
            for i, value in enumerate(values):
                n = _utf8_len(value, limit) if is_text else len(value)
                if n > limit:
                    raise _over(f"{prefix}{name}[{i}]", "bytes", n, limit)
        for name, count in self.repeated_scalars:
            if (n := len(getattr(msg, name))) > count:
                raise _over(prefix + name, "elements", n, count)
        for name, count, key_limit, value_limit, value_plan in self.maps:
            self._check_map(getattr(msg, name), prefix + name, count, key_limit, value_limit, value_plan)
        for name, plan in self.messages:
            if msg.HasField(name):
                plan.check(getattr(msg, name), f"{prefix}{name}.")
        for name, count, plan in self.repeated_messages:
            values = getattr(msg, name)
            if len(values) > count:
                raise _over(prefix + name, "elements", len(values), count)
            for i, value in enumerate(values):
                plan.check(value, f"{prefix}{name}[{i}].")

    @staticmethod
    def _check_map(mapping: Any, path: str, count: int, key_limit: int, value_limit: int,
                   value_plan: Plan | None) -> None:
        if len(mapping) > count:
            raise _over(path, "entries", len(mapping), count)
        for key, value in mapping.items():
            if isinstance(key, str) and (n := _utf8_len(key, key_limit)) > key_limit:
                raise _over(f"{path}[{_show_key(key)}]", "bytes in a key", n, key_limit)
            if value_plan is not None:
                value_plan.check(value, f"{path}[{_show_key(key)}].")
            elif isinstance(value, str | bytes) and (
                    n := _utf8_len(value, value_limit) if isinstance(value, str) else len(value)) > value_limit:
                raise _over(f"{path}[{_show_key(key)}]", "bytes in a value", n, value_limit)


_PLANS: dict[str, Plan] = {}


def plan_for(desc: Descriptor) -> Plan:
    """The plan of a message type (cached; a type that contains itself shares its plan)."""
    plan = _PLANS.get(desc.full_name)
    if plan is not None:
        return plan
    plan = _PLANS[desc.full_name] = Plan()
    floors: list[int] = []
    for f in desc.fields:
        limit = FIELD_LIMITS.get(f.name, Limit())
        if f.name in UNCHECKED and f.type == _BYTES:
            continue
        sub_type = f.message_type
        if sub_type is not None and sub_type.GetOptions().map_entry:
            key_f, value_f = sub_type.fields_by_name["key"], sub_type.fields_by_name["value"]
            value_plan = plan_for(value_f.message_type) if value_f.message_type is not None else None
            entries = limit.count or DEFAULT_MAP_ENTRIES
            key_limit = limit.key_bytes or DEFAULT_MAP_KEY_BYTES
            value_limit = limit.bytes or (DEFAULT_BYTES_BYTES if value_f.type == _BYTES else DEFAULT_STRING_BYTES)
            plan.maps.append((f.name, entries, key_limit, value_limit, value_plan))
            floors += [entries, key_limit if key_f.type == _STRING else entries, value_limit]
        elif f.is_repeated:
            count = limit.count or DEFAULT_REPEATED_COUNT
            floors.append(count)
            if sub_type is not None:
                sub = plan_for(sub_type)
                plan.repeated_messages.append((f.name, count, sub))
                floors.append(sub.floor)
            elif f.type in (_STRING, _BYTES):
                size = limit.bytes or (DEFAULT_STRING_BYTES if f.type == _STRING else DEFAULT_BYTES_BYTES)
                plan.repeated_strings.append((f.name, count, size, f.type == _STRING))
                floors.append(size)
            else:
                plan.repeated_scalars.append((f.name, count))
        elif sub_type is not None:
            sub = plan_for(sub_type)
            plan.messages.append((f.name, sub))
            floors.append(sub.floor)
        elif f.type == _STRING:
            plan.strings.append((f.name, limit.bytes or DEFAULT_STRING_BYTES))
            floors.append(limit.bytes or DEFAULT_STRING_BYTES)
        elif f.type == _BYTES:
            plan.blobs.append((f.name, limit.bytes or DEFAULT_BYTES_BYTES))
            floors.append(limit.bytes or DEFAULT_BYTES_BYTES)
    plan.floor = min(floors, default=1 << 62)
    # nested plans: drop the ones that check nothing (a message of numbers only)
    plan.messages = [(n, p) for n, p in plan.messages if p.floor < 1 << 62]
    return plan


class Validator:
    """The check of one method's request messages: ``validator(message)`` raises
    InvalidArgument for a field over its limit."""

    __slots__ = ("plan",)

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def __call__(self, message: Message) -> None:
        plan = self.plan
        if message.ByteSize() <= plan.floor:  # too small to break any limit
            return
        plan.check(message)


def validator_for(method: str) -> Validator | None:
    """The check for requests of ``method`` ("/pkg.Service/Method"); None when its
    request type is not known here or has nothing to check."""
    service_name, _, method_name = method.lstrip("/").rpartition("/")
    try:
        service = descriptor_pool.Default().FindServiceByName(service_name)
    except KeyError:
        return None
    found = service.methods_by_name.get(method_name)
    if found is None:
        return None
    plan = plan_for(found.input_type)
    return Validator(plan) if plan.floor < 1 << 62 else None


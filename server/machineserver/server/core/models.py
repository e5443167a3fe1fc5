"""The core's records: plain dataclasses, stored as JSON rows, translated to protobuf only
at the API edge."""

from __future__ import annotations

import time
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, ClassVar, Protocol, TypeVar

from machineserver.server.core.identity import DEFAULT_TENANT
from machineserver.server.drivers.base import MachineState, StopInfo, StopReason


class StoredRecord(Protocol):
    """A record dataclass with an id (what ``from_row`` builds and ``record_row`` stores)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @property
    def id(self) -> str: ...


R = TypeVar("R", bound=StoredRecord)


def now() -> float:
    return time.time()


def from_row(cls: type[R], data: dict[str, Any]) -> R:
    """Build a record from stored JSON, ignoring keys a newer server may have added."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


_STOP_FIELDS = tuple(f.name for f in fields(StopInfo))


def stop_to_dict(stop: StopInfo | None) -> dict[str, Any] | None:
    # flat fields only: cheaper than asdict's recursive deep copy (this runs on every step)
    return None if stop is None else {name: getattr(stop, name) for name in _STOP_FIELDS}


def stop_from_dict(data: dict[str, Any] | None) -> StopInfo | None:
    if not data:
        return None
    return StopInfo(**{**data, "reason": StopReason(data["reason"])})


@dataclass
class SessionRecord:
    id: str
    board: str
    board_config: str  # YAML
    backend: str
    display_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    max_instructions: int = 0
    max_console_bytes: int = 0
    icount: bool = False
    coverage: bool = False  # started ready for coverage collection
    # when the server captures a failure capsule itself (core/capsules): on_fault, assert_symbols
    capsule_policy: dict[str, Any] = field(default_factory=dict)
    remote_target: str = ""  # gdbremote: the GDB server (normal form, see core/remote_targets.py)
    remote_console: str = ""  # gdbremote: the console endpoint, "" for none
    backend_details: dict[str, str] = field(default_factory=dict)  # what the machine said at power on
    program: str = ""  # program id
    state: str = MachineState.OFF.value
    state_reason: str = ""
    exit_code: int | None = None
    last_stop: dict[str, Any] | None = None
    owner: str = ""
    tenant: str = DEFAULT_TENANT
    create_time: float = field(default_factory=now)
    update_time: float = field(default_factory=now)

    @property
    def name(self) -> str:
        return f"sessions/{self.id}"


@dataclass
class ProgramRecord:
    id: str
    sha256: str
    format: str  # ImageFormat value
    size_bytes: int
    display_name: str = ""
    load_address: int = 0
    entry_point: int | None = None
    arch: str = ""
    segments: list[tuple[int, int]] = field(default_factory=list)
    has_symbols: bool = False
    has_debug_info: bool = False
    sources_sha256: str = ""  # the source bundle uploaded with it (a blob), "" when none
    source_files: list[str] = field(default_factory=list)  # the bundle's paths
    owner: str = ""
    tenant: str = DEFAULT_TENANT
    create_time: float = field(default_factory=now)

    @property
    def name(self) -> str:
        return f"programs/{self.id}"


@dataclass
class SnapshotRecord:
    id: str
    session: str  # session id
    board: str
    backend: str
    sha256: str
    size_bytes: int
    program: str = ""
    display_name: str = ""
    instructions: int = 0
    owner: str = ""
    tenant: str = DEFAULT_TENANT
    create_time: float = field(default_factory=now)

    @property
    def name(self) -> str:
        return f"snapshots/{self.id}"


@dataclass
class BoardTemplateRecord:
    id: str  # board name
    config: str  # YAML/JSON text as given
    builtin: bool = False
    etag: str = ""
    owner: str = ""
    tenant: str = DEFAULT_TENANT
    create_time: float = field(default_factory=now)
    update_time: float = field(default_factory=now)

    @property
    def name(self) -> str:
        return f"boardTemplates/{self.id}"


def record_row(rec: StoredRecord, **index_columns: Any) -> dict[str, Any]:
    """A record as a database row: the common indexed columns, the given extra ones, and
    the whole record as JSON in ``data``."""
    data = asdict(rec)
    return {
        "id": rec.id,
        "owner": data.get("owner", ""),
        "create_time": data.get("create_time", 0.0),
        "update_time": data.get("update_time", data.get("create_time", 0.0)),
        **({"tenant": data["tenant"]} if "tenant" in data else {}),
        **index_columns,
        "data": data,
    }

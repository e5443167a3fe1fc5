"""Board templates: boards are data (YAML/JSON), parsed and checked into BoardSpec.

The templates shipped with the package live in ``machineserver/server/boards/*.yaml``;
user templates are stored records (see :mod:`machineserver.server.core.catalog`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

from machineserver.server.core.errors import InvalidArgument
from machineserver.server.drivers.base import Arch, BoardSpec, MemoryRegion, PeripheralSpec

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")
# libyaml's safe loader when PyYAML was built with it: the same YAML, ~8x faster than the
# pure-Python one (~0.3 ms for a shipped board instead of ~2.3 ms)
_YamlLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_board_text(text: str, *, field: str = "config") -> dict[str, Any]:
    """Parse a board config given as YAML or JSON (JSON is YAML, but its errors read
    better from the JSON parser)."""
    stripped = text.lstrip()
    try:
        data = json.loads(text) if stripped.startswith("{") else yaml.load(text, Loader=_YamlLoader)  # a safe loader
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InvalidArgument(field, f"not valid YAML or JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(field, "a board config must be a mapping")
    return data


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise InvalidArgument(field, "must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise InvalidArgument(field, f"must be an integer, got {value!r}")


def _str(data: Mapping[str, Any], key: str, field: str, *, required: bool = True) -> str:
    value = data.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}.{key}", "must be a string")
    if required and not value:
        raise InvalidArgument(f"{field}.{key}", "is required")
    return value


def check_board_name(name: str, field: str = "name") -> str:
    if not name or len(name) > 63 or not set(name) <= _NAME_CHARS or not name[0].isalnum():
        raise InvalidArgument(
            field, f"{name!r} is not a valid board name (1-63 of a-z 0-9 - _ ., starting alnum)"
        )
    return name


def board_from_dict(data: Mapping[str, Any], *, field: str = "config") -> BoardSpec:
    """Check a board config and build its BoardSpec; InvalidArgument names the field."""
    name = check_board_name(_str(data, "name", field), f"{field}.name")
    arch_text = _str(data, "arch", field)
    try:
        arch = Arch(arch_text)
    except ValueError:
        raise InvalidArgument(
            f"{field}.arch", f"{arch_text!r} is not one of {', '.join(a.value for a in Arch)}"
        ) from None
    cpu_mhz = data.get("cpu_mhz", 1)
    if not isinstance(cpu_mhz, int | float) or isinstance(cpu_mhz, bool) or cpu_mhz <= 0:
        raise InvalidArgument(f"{field}.cpu_mhz", "must be a positive number")

    memory_data = data.get("memory")
    if not isinstance(memory_data, list) or not memory_data:
        raise InvalidArgument(f"{field}.memory", "must be a non-empty list of regions")
    memory: list[MemoryRegion] = []
    for i, item in enumerate(memory_data):
        f = f"{field}.memory[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f, "must be a mapping")
        kind = _str(item, "kind", f, required=False) or "ram"
        if kind not in ("ram", "flash", "rom"):
            raise InvalidArgument(f"{f}.kind", f"{kind!r} is not one of ram, flash, rom")
        size = _int(item.get("size"), f"{f}.size")
        base = _int(item.get("base"), f"{f}.base")
        if size <= 0 or base < 0 or base + size > 1 << 32:
            raise InvalidArgument(f, "region must lie inside the 32-bit address space")
        memory.append(
            MemoryRegion(
                name=_str(item, "name", f),
                base=base,
                size=size,
                kind=kind,
                writable=bool(item.get("writable", kind == "ram")),
            )
        )
    spans = sorted((m.base, m.end, m.name) for m in memory)
    for (_, end_a, name_a), (base_b, _, name_b) in itertools.pairwise(spans):
        if base_b < end_a:
            raise InvalidArgument(f"{field}.memory", f"regions {name_a} and {name_b} overlap")

    peripherals: list[PeripheralSpec] = []
    for i, item in enumerate(data.get("peripherals") or []):
        f = f"{field}.peripherals[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f, "must be a mapping")
        irq = item.get("irq")
        props = item.get("properties") or {}
        if not isinstance(props, dict):
            raise InvalidArgument(f"{f}.properties", "must be a mapping")
        peripherals.append(
            PeripheralSpec(
                name=_str(item, "name", f),
                model=_str(item, "model", f),
                base=_int(item.get("base"), f"{f}.base"),
                size=_int(item.get("size", 0x1000), f"{f}.size"),
                irq=None if irq is None else _int(irq, f"{f}.irq"),
                properties=dict(props),
            )
        )
    console = _str(data, "console", field, required=False)
    if console and console not in {p.name for p in peripherals}:
        raise InvalidArgument(f"{field}.console", f"no peripheral named {console!r}")
    backends = data.get("backends") or {}
    if not isinstance(backends, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in backends.items()
    ):
        raise InvalidArgument(f"{field}.backends", "must map backend names to machine names")
    reset_vector = data.get("reset_vector")
    return BoardSpec(
        name=name,
        description=_str(data, "description", field, required=False),
        arch=arch,
        cpu=_str(data, "cpu", field),
        cpu_mhz=float(cpu_mhz),
        memory=tuple(memory),
        peripherals=tuple(peripherals),
        console=console,
        backend_machines=dict(backends),
        reset_vector=None if reset_vector is None else _int(reset_vector, f"{field}.reset_vector"),
        vector_table=_int(data.get("vector_table", 0), f"{field}.vector_table"),
    )


def board_to_dict(board: BoardSpec) -> dict[str, Any]:
    """The board as the plain data :func:`board_from_dict` reads back into an equal
    BoardSpec (what the catalog stores next to a template's text, so it is parsed once)."""
    return {
        "name": board.name,
        "description": board.description,
        "arch": board.arch.value,
        "cpu": board.cpu,
        "cpu_mhz": board.cpu_mhz,
        "memory": [{"name": m.name, "base": m.base, "size": m.size, "kind": m.kind, "writable": m.writable}
                   for m in board.memory],
        "peripherals": [{"name": p.name, "model": p.model, "base": p.base, "size": p.size, "irq": p.irq,
                         "properties": dict(p.properties)} for p in board.peripherals],
        "console": board.console,
        "backends": dict(board.backend_machines),
        "reset_vector": board.reset_vector,
        "vector_table": board.vector_table,
    }


def shipped_board_texts() -> dict[str, str]:
    """The YAML templates shipped with the package, by board name (file stem)."""
    folder = resources.files("machineserver.server.boards")
    out: dict[str, str] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = entry.read_text(encoding="utf-8")
    return out


def load_shipped_boards() -> dict[str, BoardSpec]:
    boards: dict[str, BoardSpec] = {}
    for stem, text in shipped_board_texts().items():
        spec = board_from_dict(parse_board_text(text), field=f"boards/{stem}.yaml")
        boards[spec.name] = spec
    return boards

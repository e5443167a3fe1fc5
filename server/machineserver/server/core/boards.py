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

from machineserver.server.core import limits
from machineserver.server.core.errors import InvalidArgument
from machineserver.server.core.limits import DEFAULT_BOUNDS, BoardBounds
from machineserver.server.drivers.base import Arch, BoardSpec, MemoryRegion, PeripheralSpec

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")
# libyaml's safe loader when PyYAML was built with it: the same YAML, ~8x faster than the
# pure-Python one (~0.3 ms for a shipped board instead of ~2.3 ms)
_YamlLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def _check_yaml_shape(text: str, field: str, bounds: BoardBounds) -> None:
    """Before anything is built from the YAML: its nesting (at most max_config_depth) and
    its values with aliases expanded (at most max_config_nodes: a "billion laughs" of
    aliases to aliases is refused here, not expanded later), from the parser's events."""
    depth = nodes = 0
    open_nodes: list[tuple[str | None, int]] = []  # per open collection: its anchor, nodes before it
    sizes: dict[str, int] = {}  # anchor -> the values it stands for
    for event in yaml.parse(text, Loader=_YamlLoader):
        if isinstance(event, _OPEN):
            depth += 1
            if depth > bounds.max_config_depth:
                raise InvalidArgument(field, f"nested deeper than {bounds.max_config_depth} levels")
            open_nodes.append((event.anchor, nodes))
            nodes += 1
        elif isinstance(event, _CLOSE):
            depth -= 1
            anchor, before = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = nodes - before
        elif isinstance(event, yaml.ScalarEvent):
            nodes += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            nodes += sizes.get(event.anchor or "", 1)
        if nodes > bounds.max_config_nodes:
            raise InvalidArgument(field, f"more than {bounds.max_config_nodes} values (aliases expanded)")


def _check_depth(data: Any, field: str, max_depth: int) -> None:
    """At most ``max_depth`` levels of mappings and lists (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise InvalidArgument(field, f"nested deeper than {max_depth} levels")
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values() if isinstance(v, dict | list)]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value if isinstance(v, dict | list)]


def parse_board_text(text: str, *, field: str = "config", bounds: BoardBounds = DEFAULT_BOUNDS) -> dict[str, Any]:
    """Parse a board config given as YAML or JSON (JSON is YAML, but its errors read
    better from the JSON parser). Its size, nesting and (YAML) aliases are bounded by
    ``bounds`` before the parser builds anything."""
    if len(text) > bounds.max_config_bytes or len(text.encode("utf-8", "surrogatepass")) > bounds.max_config_bytes:
        raise InvalidArgument(field, f"at most {bounds.max_config_bytes} bytes")
    stripped = text.lstrip()
    try:
        if stripped.startswith("{"):
            data = json.loads(text)
            _check_depth(data, field, bounds.max_config_depth)
        else:
            _check_yaml_shape(text, field, bounds)
            data = yaml.load(text, Loader=_YamlLoader)  # a safe loader
    except RecursionError:
        raise InvalidArgument(field, f"nested deeper than {bounds.max_config_depth} levels") from None
    except (ValueError, yaml.YAMLError) as exc:  # ValueError: JSON's, or a number YAML cannot build
        raise InvalidArgument(field, f"not valid YAML or JSON: {str(exc)[:300]}") from None
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


def board_from_dict(data: Mapping[str, Any], *, field: str = "config", bounds: BoardBounds | None = None) -> BoardSpec:
    """Check a board config and build its BoardSpec; InvalidArgument names the field.
    ``bounds``: what a client's board may ask for (memory, interrupts; checked for boards
    clients give, not for the ones already stored)."""
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
    if len(memory_data) > limits.MAX_MEMORY_REGIONS:
        raise InvalidArgument(f"{field}.memory", f"at most {limits.MAX_MEMORY_REGIONS} regions")
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

    peripheral_data = data.get("peripherals") or []
    if not isinstance(peripheral_data, list) or len(peripheral_data) > limits.MAX_PERIPHERALS:
        raise InvalidArgument(f"{field}.peripherals", f"must be a list of at most {limits.MAX_PERIPHERALS} peripherals")
    peripherals: list[PeripheralSpec] = []
    for i, item in enumerate(peripheral_data):
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
                irq=None if irq is None else _irq(irq, f"{f}.irq"),
                properties=_properties(_str(item, "model", f), props, f"{f}.properties"),
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
    description = _str(data, "description", field, required=False)
    if len(description.encode("utf-8", "surrogatepass")) > limits.MAX_DESCRIPTION_BYTES:
        raise InvalidArgument(f"{field}.description", f"at most {limits.MAX_DESCRIPTION_BYTES} bytes")
    if bounds is not None:
        _check_bounds(memory, peripherals, field, bounds)
    return BoardSpec(
        name=name,
        description=description,
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


def _irq(value: Any, field: str) -> int:
    irq = _int(value, field)
    if not 0 <= irq < 1024:
        raise InvalidArgument(field, f"must be an interrupt number from 0 to 1023, got {irq}")
    return irq


# per peripheral model, the integer properties the emulation sizes things by: (low, high)
_INT_PROPERTIES: dict[str, dict[str, tuple[int, int]]] = {
    "nvic": {"num_irq": (1, limits.MAX_IRQS), "prio_bits": (1, 8)},
    "uart-cmsdk": {"tx_irq": (0, 1023)},
    "clint": {"timebase_hz": (1, 10**10)},
}


def _properties(model: str, props: dict[str, Any], field: str) -> dict[str, Any]:
    """A peripheral's properties; the ones the emulation sizes things by must be integers
    in their range (an NVIC of 2^40 interrupts, or of -100, is refused here)."""
    checked = dict(props)
    for key, (low, high) in _INT_PROPERTIES.get(model, {}).items():
        if key in checked:
            value = _int(checked[key], f"{field}.{key}")
            if not low <= value <= high:
                raise InvalidArgument(f"{field}.{key}", f"must be from {low} to {high}, got {value}")
            checked[key] = value
    return checked


def _check_bounds(memory: list[MemoryRegion], peripherals: list[PeripheralSpec], field: str,
                  bounds: BoardBounds) -> None:
    total = sum(m.size for m in memory)
    if total > bounds.max_board_memory_bytes:
        raise InvalidArgument(f"{field}.memory", f"{total} bytes of memory in all; the server allows at most "
                                                 f"{bounds.max_board_memory_bytes} (limits.max_board_memory_bytes)")
    for i, p in enumerate(peripherals):
        num_irq = p.properties.get("num_irq") if p.model == "nvic" else None
        if isinstance(num_irq, int) and num_irq > bounds.max_irqs:
            raise InvalidArgument(f"{field}.peripherals[{i}].properties.num_irq",
                                  f"at most {bounds.max_irqs} (limits.max_irqs), got {num_irq}")
        if p.irq is not None and p.irq >= bounds.max_irqs:
            raise InvalidArgument(f"{field}.peripherals[{i}].irq",
                                  f"must be below {bounds.max_irqs} (limits.max_irqs), got {p.irq}")


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

"""Co-simulation records and the rules a topology must keep.

Time is kept in *reference cycles*: cycles of the first member's clock. A member i at
reference time T has run ``T * hz_i // hz_ref`` cycles since it joined (its ``origin``),
so members on boards of different clocks meet at the same virtual instant. Virtual ns =
``T * 10**9 // hz_ref``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from machineserver.server.core.errors import InvalidArgument
from machineserver.server.core.identity import DEFAULT_TENANT
from machineserver.server.core.models import now
from machineserver.server.drivers.base import BoardSpec
from machineserver.server.lockstep.links import Doorbell, Link, SharedRegion, link_from_dict

MAX_MEMBERS = 16
MAX_LINKS = 64
MAX_SHARED_BYTES = 1 << 20
DEFAULT_QUANTUM_NS = 100_000  # what the error for a missing quantum suggests
MAX_QUANTUM_NS = 10**9  # one virtual second
DEFAULT_SERIAL_QUEUE = 64 << 10
MAX_SERIAL_QUEUE = 16 << 20
MAX_LATENCY_NS = 10**9


class CoSimState(enum.StrEnum):
    PAUSED = "paused"
    RUNNING = "running"
    STOPPED = "stopped"  # a member exited or faulted
    FAILED = "failed"  # a member's backend failed


@dataclass
class CoSimRecord:
    """A co-simulation as stored: topology, where it stands, why."""

    id: str
    sessions: list[str]  # session ids, in order
    links: list[dict[str, Any]]  # link_to_dict each
    quantum_ref: int  # reference cycles per quantum
    hz_ref: int
    quantum_spec: dict[str, int] = field(default_factory=dict)  # as asked: quantum_ns / quantum_instructions
    display_name: str = ""
    state: str = CoSimState.PAUSED.value
    state_reason: str = ""
    quanta: int = 0
    time_ref: int = 0  # reference cycles reached (a barrier, or the halt instant)
    origins: list[int] = field(default_factory=list)  # each member's cycle count at time 0
    last_stop: dict[str, Any] | None = None
    link_state: dict[str, Any] = field(default_factory=dict)  # links.LinkState.to_dict()
    owner: str = ""
    tenant: str = DEFAULT_TENANT
    create_time: float = field(default_factory=now)
    update_time: float = field(default_factory=now)

    @property
    def name(self) -> str:
        return f"cosimulations/{self.id}"

    def link_specs(self) -> list[Link]:
        return [link_from_dict(d) for d in self.links]

    def ns(self, time_ref: int) -> int:
        return time_ref * 10**9 // self.hz_ref


@dataclass(frozen=True)
class CoSimSnapshotRecord:
    id: str  # "{cosim}.{snapshot}" in the table; the snapshot part is unique per cosim
    cosim: str
    snapshot: str
    sha256: str
    size_bytes: int
    virtual_time_ns: int
    quanta: int
    shape: tuple[str, ...]
    display_name: str = ""
    owner: str = ""
    tenant: str = DEFAULT_TENANT
    create_time: float = field(default_factory=now)

    @property
    def name(self) -> str:
        return f"cosimulations/{self.cosim}/snapshots/{self.snapshot}"


def board_hz(board: BoardSpec) -> int:
    return int(board.cpu_mhz * 1_000_000)


def irq_lines(board: BoardSpec) -> int:
    """External interrupt lines a co-simulation can raise on ``board`` (Cortex-M: the
    NVIC's, 0 when the board has no NVIC model)."""
    for p in board.peripherals:
        if p.model == "nvic":
            return int(p.properties.get("num_irq", 32))
    return 0


def ram_holds(board: BoardSpec, address: int, size: int) -> bool:
    region = board.region_at(address, size)
    return region is not None and region.kind == "ram" and region.writable


def check_quantum(quantum_ns: int, quantum_instructions: int, hz_ref: int) -> int:
    """Reference cycles per quantum from the request's sync policy."""
    if quantum_ns and quantum_instructions:
        raise InvalidArgument("sync.quantum_ns", "give quantum_ns or quantum_instructions, not both")
    if quantum_instructions:
        if quantum_instructions > MAX_QUANTUM_NS:
            raise InvalidArgument("sync.quantum_instructions", f"at most {MAX_QUANTUM_NS}")
        return quantum_instructions
    if not quantum_ns:
        raise InvalidArgument("sync.quantum_ns", "a quantum is required: quantum_ns (e.g. "
                              f"{DEFAULT_QUANTUM_NS}) or quantum_instructions; it cannot be zero")
    ns = quantum_ns
    if ns > MAX_QUANTUM_NS:
        raise InvalidArgument("sync.quantum_ns", f"at most {MAX_QUANTUM_NS} (one virtual second)")
    cycles = ns * hz_ref // 10**9
    if cycles < 1:
        raise InvalidArgument("sync.quantum_ns", f"{ns} ns is less than one cycle of the first member's "
                              f"{hz_ref} Hz clock")
    return cycles


def validate_links(links: list[Link], boards: list[BoardSpec]) -> None:
    """The rules a topology keeps; InvalidArgument naming the field otherwise."""
    if len(links) > MAX_LINKS:
        raise InvalidArgument("links", f"at most {MAX_LINKS} links")
    # (member, start, end, field) of every range a link claims, to find overlaps
    claimed: list[tuple[int, int, int, str]] = []
    serial_users: dict[int, str] = {}

    def claim(member: int, address: int, size: int, where: str) -> None:
        board = boards[member]
        if not ram_holds(board, address, size):
            raise InvalidArgument(where, f"0x{address:x}+{size} is not inside one RAM region of board "
                                  f"{board.name}")
        for other, start, end, other_where in claimed:
            if other == member and address < end and start < address + size:
                raise InvalidArgument(where, f"0x{address:x}+{size} overlaps {other_where} on the same "
                                      "member")
        claimed.append((member, address, address + size, where))

    for i, link in enumerate(links):
        base = f"links[{i}]"
        if isinstance(link, SharedRegion):
            if len(link.mappings) < 2:
                raise InvalidArgument(f"{base}.shared_memory.mappings", "needs two or more members")
            if not 0 < link.size <= MAX_SHARED_BYTES:
                raise InvalidArgument(f"{base}.shared_memory.size", f"must be 1..{MAX_SHARED_BYTES} bytes")
            members = [m for m, _ in link.mappings]
            if len(set(members)) != len(members):
                raise InvalidArgument(f"{base}.shared_memory.mappings", "a member appears twice")
            for j, (member, address) in enumerate(link.mappings):
                claim(member, address, link.size, f"{base}.shared_memory.mappings[{j}].address")
        elif isinstance(link, Doorbell):
            if link.source == link.target:
                raise InvalidArgument(f"{base}.interrupt.to_session", "must differ from from_session")
            lines = irq_lines(boards[link.target])
            if link.irq >= lines:
                raise InvalidArgument(f"{base}.interrupt.irq", f"board {boards[link.target].name} has "
                                      f"{lines} external interrupt lines (0..{lines - 1})" if lines else
                                      f"board {boards[link.target].name} has no interrupt controller model")
            if link.latency_ns > MAX_LATENCY_NS:
                raise InvalidArgument(f"{base}.interrupt.latency_ns", f"at most {MAX_LATENCY_NS}")
            claim(link.source, link.address, 4, f"{base}.interrupt.doorbell_address")
        else:
            if link.a == link.b:
                raise InvalidArgument(f"{base}.serial.session_b", "must differ from session_a")
            if not 0 < link.queue_limit <= MAX_SERIAL_QUEUE:
                raise InvalidArgument(f"{base}.serial.queue_limit_bytes", f"at most {MAX_SERIAL_QUEUE}")
            for member, where in ((link.a, "session_a"), (link.b, "session_b")):
                if member in serial_users:
                    raise InvalidArgument(f"{base}.serial.{where}", f"the member's console is already in "
                                          f"{serial_users[member]}")
                serial_users[member] = base

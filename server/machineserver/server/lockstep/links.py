"""What happens at a barrier: a pure function of the members' quantum results and the
link state, so a co-simulation is deterministic by construction.

The order at a barrier at reference time T, every step in member order:

1. shared memory: each member's copy of a region is compared with the region as of the
   last barrier; the bytes a member changed are merged in member order (on a byte two
   members both changed, the later member wins), and every copy that differs from the
   result is written back before the next quantum;
2. doorbells: a doorbell word with bits of its mask set has those bits cleared (written
   back) and its interrupt scheduled at ``T + latency``; every interrupt whose time has
   come (``<= T``) is set pending on its target;
3. serial: the byte offered to a receiver at the last barrier is delivered (at that
   barrier's time: it was in the UART from the quantum's start) if its UART took it
   (settled early when a halt cuts the quantum); what each member transmitted in the quantum is queued (beyond the queue's
   limit, dropped and counted); then the next byte of each queue is offered.

So a member woken by a doorbell sees every shared-memory write its peer made before
ringing it, and serial bytes arrive in the order they were sent, at most one per barrier
per direction (a UART's pace), never faster than the receiver takes them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from machineserver.server.drivers.base import BarrierInput, QuantumResult, Segment

_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class SharedRegion:
    """One region in several members: (member index, address) each."""

    mappings: tuple[tuple[int, int], ...]
    size: int


@dataclass(frozen=True)
class Doorbell:
    source: int
    address: int
    mask: int
    target: int
    irq: int
    latency_ns: int


@dataclass(frozen=True)
class Serial:
    a: int
    b: int
    queue_limit: int


Link = SharedRegion | Doorbell | Serial
# what CapabilitiesService lists as the bus kinds co-simulation links model
LINK_KINDS = ("shared-memory", "interrupt", "serial")


def link_to_dict(link: Link) -> dict[str, Any]:
    if isinstance(link, SharedRegion):
        return {"kind": "shared_memory", "mappings": [list(m) for m in link.mappings], "size": link.size}
    if isinstance(link, Doorbell):
        return {"kind": "interrupt", "source": link.source, "address": link.address, "mask": link.mask,
                "target": link.target, "irq": link.irq, "latency_ns": link.latency_ns}
    return {"kind": "serial", "a": link.a, "b": link.b, "queue_limit": link.queue_limit}


def link_from_dict(data: dict[str, Any]) -> Link:
    kind = data["kind"]
    if kind == "shared_memory":
        return SharedRegion(tuple((int(i), int(a)) for i, a in data["mappings"]), int(data["size"]))
    if kind == "interrupt":
        return Doorbell(data["source"], data["address"], data["mask"], data["target"], data["irq"],
                        data["latency_ns"])
    return Serial(data["a"], data["b"], data["queue_limit"])


@dataclass(frozen=True)
class Traffic:
    """One item of the link-traffic log (what the event stream carries)."""

    kind: str  # "shared_memory" | "interrupt" | "serial" | "drop"
    time_ref: int  # when: the barrier; for a serial byte, the barrier it was delivered at
    link: int
    source: int
    target: int = -1
    data: bytes = b""
    offset: int = 0
    irq: int = 0


@dataclass
class LinkCounters:
    bytes: int = 0
    interrupts: int = 0
    dropped: int = 0


@dataclass
class LinkState:
    """Everything the links hold between barriers (part of a coordinated snapshot)."""

    shared: dict[int, bytes] = field(default_factory=dict)  # link -> region content at the last barrier
    queues: dict[int, list[bytearray]] = field(default_factory=dict)  # serial link -> [a->b, b->a]
    offered: dict[int, list[int]] = field(default_factory=dict)  # serial link -> bytes offered [a->b, b->a]
    pending: list[tuple[int, int]] = field(default_factory=list)  # (due time_ref, doorbell link), in order
    counters: dict[int, LinkCounters] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shared": {str(k): v.hex() for k, v in self.shared.items()},
            "queues": {str(k): [bytes(q).hex() for q in v] for k, v in self.queues.items()},
            "offered": {str(k): list(v) for k, v in self.offered.items()},
            "pending": [list(p) for p in self.pending],
            "counters": {str(k): [c.bytes, c.interrupts, c.dropped] for k, c in self.counters.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkState:
        return cls(
            shared={int(k): bytes.fromhex(v) for k, v in data.get("shared", {}).items()},
            queues={int(k): [bytearray.fromhex(q) for q in v] for k, v in data.get("queues", {}).items()},
            offered={int(k): [int(x) for x in v] for k, v in data.get("offered", {}).items()},
            pending=[(int(a), int(b)) for a, b in data.get("pending", [])],
            counters={int(k): LinkCounters(*v) for k, v in data.get("counters", {}).items()},
        )


class Watches:
    """Which (address, size) ranges each member's quanta report, and what each is."""

    def __init__(self, links: list[Link], members: int) -> None:
        self.ranges: list[list[tuple[int, int]]] = [[] for _ in range(members)]
        # (link, mapping index or -1 for a doorbell) -> (member, index in its ranges)
        self.where: dict[tuple[int, int], tuple[int, int]] = {}
        for li, link in enumerate(links):
            if isinstance(link, SharedRegion):
                for mi, (member, address) in enumerate(link.mappings):
                    self._add(li, mi, member, address, link.size)
            elif isinstance(link, Doorbell):
                self._add(li, -1, link.source, link.address, 4)

    def _add(self, link: int, mapping: int, member: int, address: int, size: int) -> None:
        self.where[(link, mapping)] = (member, len(self.ranges[member]))
        self.ranges[member].append((address, size))


def _changed_span(old: bytes, new: bytes) -> tuple[int, int] | None:
    """The smallest [start, end) holding every byte that differs; None when equal. Two
    big-integer operations, not a Python loop: the set bits of ``old ^ new`` (read little
    endian) are the changed bytes' bits."""
    if old == new:
        return None
    diff = int.from_bytes(old, "little") ^ int.from_bytes(new, "little")
    return ((diff & -diff).bit_length() - 1) // 8, (diff.bit_length() + 7) // 8


def _merge(into: bytearray, before: bytes, copy: bytes, start: int, end: int) -> None:
    """Write into ``into`` the bytes of ``copy[start:end]`` that differ from ``before``."""
    for k in range(start, end):
        if copy[k] != before[k]:
            into[k] = copy[k]


def _time_due(latency_ns: int, hz_ref: int) -> int:
    return -(-latency_ns * hz_ref // 10**9)  # ceiling: never earlier than asked


class Exchange:
    """The barrier of one co-simulation (its links and their state)."""

    def __init__(self, links: list[Link], members: int, hz_ref: int, state: LinkState | None = None) -> None:
        self.links = links
        self.members = members
        self.hz_ref = hz_ref
        self.watches = Watches(links, members)
        self.state = state or LinkState()
        for li, link in enumerate(links):
            self.state.counters.setdefault(li, LinkCounters())
            if isinstance(link, Serial):
                self.state.queues.setdefault(li, [bytearray(), bytearray()])
                self.state.offered.setdefault(li, [0, 0])

    def prime(self, contents: list[tuple[bytes, ...]]) -> None:
        """Take the shared regions' contents when a run begins and none are known (a new
        co-simulation): the first member's copy is the region's value, and the others are
        written to match at the first barrier (see :meth:`initial_writes`)."""
        for li, link in enumerate(self.links):
            if isinstance(link, SharedRegion) and li not in self.state.shared:
                member, index = self.watches.where[(li, 0)]
                self.state.shared[li] = contents[member][index]

    def initial_writes(self, contents: list[tuple[bytes, ...]]) -> list[list[Segment]]:
        """Writes that make every member's copy of each region equal the known value."""
        writes: list[list[Segment]] = [[] for _ in range(self.members)]
        for li, link in enumerate(self.links):
            if not isinstance(link, SharedRegion):
                continue
            value = self.state.shared[li]
            for mi, (member, address) in enumerate(link.mappings):
                _, index = self.watches.where[(li, mi)]
                if contents[member][index] != value:
                    writes[member].append(Segment(address, value))
        return writes

    def deliveries(self, start_ref: int, accepted: list[int]) -> list[Traffic]:
        """Settle the serial bytes offered at the barrier at ``start_ref`` (the quantum's
        start), now that the quantum's first call says which receivers took theirs: at a
        halt inside the quantum, or at its end barrier (then a no-op if settled)."""
        traffic: list[Traffic] = []
        st = self.state
        for li, link in enumerate(self.links):
            if not isinstance(link, Serial):
                continue
            queues, offered = st.queues[li], st.offered[li]
            for d, (src, dst) in enumerate(((link.a, link.b), (link.b, link.a))):
                if offered[d] and accepted[dst]:
                    taken = bytes(queues[d][: accepted[dst]])
                    del queues[d][: len(taken)]
                    st.counters[li].bytes += len(taken)
                    traffic.append(Traffic("serial", start_ref, li, src, dst, data=taken))
                offered[d] = 0
        return traffic

    def barrier(self, time_ref: int, start_ref: int, results: list[QuantumResult], console: list[bytes]) -> tuple[
            list[BarrierInput], list[Traffic]]:
        """The barrier at ``time_ref`` after every member ran its quantum (which began at
        ``start_ref``; ``console``: what each transmitted in the whole quantum). Returns
        the inputs for the next quantum and the traffic, in order."""
        writes: list[list[Segment]] = [[] for _ in range(self.members)]
        irqs: list[list[int]] = [[] for _ in range(self.members)]
        rx: list[bytes] = [b""] * self.members
        traffic: list[Traffic] = self.deliveries(start_ref, [r.accepted for r in results])
        st = self.state
        for li, link in enumerate(self.links):
            if isinstance(link, SharedRegion):
                self._share(li, link, time_ref, results, writes, traffic)
        for li, link in enumerate(self.links):
            if isinstance(link, Doorbell):
                member, index = self.watches.where[(li, -1)]
                (word,) = _U32.unpack(results[member].watched[index][:4])
                if word & link.mask:
                    writes[member].append(Segment(link.address, _U32.pack(word & ~link.mask)))
                    st.pending.append((time_ref + _time_due(link.latency_ns, self.hz_ref), li))
        due = [p for p in st.pending if p[0] <= time_ref]
        if due:
            st.pending = [p for p in st.pending if p[0] > time_ref]
            for _, li in sorted(due):
                bell = self.links[li]
                assert isinstance(bell, Doorbell)
                irqs[bell.target].append(bell.irq)
                st.counters[li].interrupts += 1
                traffic.append(Traffic("interrupt", time_ref, li, bell.source, bell.target, irq=bell.irq))
        for li, link in enumerate(self.links):
            if isinstance(link, Serial):
                self._serial(li, link, time_ref, console, rx, traffic)
        inputs = [BarrierInput(tuple(writes[i]), tuple(irqs[i]), rx[i]) for i in range(self.members)]
        return inputs, traffic

    def _share(self, li: int, link: SharedRegion, time_ref: int, results: list[QuantumResult],
               writes: list[list[Segment]], traffic: list[Traffic]) -> None:
        before = self.state.shared[li]
        copies: list[bytes] = []
        writers: list[tuple[int, int, int]] = []  # (mapping index, start, end) of each copy that changed
        for mi, (member, _) in enumerate(link.mappings):
            _, index = self.watches.where[(li, mi)]
            copy = results[member].watched[index]
            copies.append(copy)
            span = _changed_span(before, copy)
            if span is not None:
                writers.append((mi, *span))
                traffic.append(Traffic("shared_memory", time_ref, li, member, data=copy[span[0]:span[1]],
                                       offset=span[0]))
        if not writers:
            return
        if len(writers) == 1:  # one writer (the common case): its copy is the value
            value = copies[writers[0][0]]
        else:
            merged = bytearray(before)
            for mi, start, end in writers:
                _merge(merged, before, copies[mi], start, end)
            value = bytes(merged)
        self.state.shared[li] = value
        for mi, (member, address) in enumerate(link.mappings):
            if len(writers) == 1 and mi == writers[0][0]:
                continue
            span = _changed_span(copies[mi], value)
            if span is not None:
                start, end = span
                writes[member].append(Segment(address + start, value[start:end]))
                self.state.counters[li].bytes += end - start

    def _serial(self, li: int, link: Serial, time_ref: int, console: list[bytes], rx: list[bytes],
                traffic: list[Traffic]) -> None:
        st = self.state
        queues, offered = st.queues[li], st.offered[li]
        for d, (src, dst) in enumerate(((link.a, link.b), (link.b, link.a))):
            queue = queues[d]
            sent = console[src]
            if sent:
                room = link.queue_limit - len(queue)
                if len(sent) > room:
                    dropped = sent[max(room, 0):]
                    sent = sent[: max(room, 0)]
                    st.counters[li].dropped += len(dropped)
                    traffic.append(Traffic("drop", time_ref, li, src, dst, data=dropped))
                queue += sent
            if queue:
                rx[dst] = bytes(queue[:1])
                offered[d] = 1

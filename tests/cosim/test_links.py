"""The barrier's rules (lockstep/links.py), on made-up quantum results: the documented
ordering of shared memory, doorbells and serial bytes, conflicts, coalescing, latency,
backpressure and counted drops."""

from __future__ import annotations

import struct

from machineserver.server.drivers.base import QuantumResult, Segment
from machineserver.server.lockstep.links import Doorbell, Exchange, Link, LinkState, Serial, SharedRegion

HZ = 25_000_000
ZERO = bytes(8)


def result(watched: tuple[bytes, ...] = (), accepted: int = 0) -> QuantumResult:
    return QuantumResult(cycles=0, stop=None, console=b"", accepted=accepted, watched=watched)


def word(value: int) -> bytes:
    return struct.pack("<I", value)


def exchange(links: list[Link], members: int, initial: list[tuple[bytes, ...]]) -> Exchange:
    ex = Exchange(links, members, HZ)
    ex.prime(initial)
    return ex


def test_shared_memory_writes_reach_the_others_and_the_later_member_wins_a_conflict() -> None:
    region = SharedRegion(((0, 0x1000), (1, 0x2000), (2, 0x3000)), 8)
    ex = exchange([region], 3, [(ZERO,), (ZERO,), (ZERO,)])
    # member 0 writes bytes 0..1, member 2 writes bytes 1..2: byte 1 is written by both
    a = bytes([1, 1, 0, 0, 0, 0, 0, 0])
    c = bytes([0, 3, 3, 0, 0, 0, 0, 0])
    inputs, traffic = ex.barrier(100, 0, [result((a,)), result((ZERO,)), result((c,))], [b""] * 3)
    merged = bytes([1, 3, 3, 0, 0, 0, 0, 0])
    assert ex.state.shared[0] == merged
    # each copy gets exactly the bytes it lacks, at its own address
    assert inputs[0].writes == (Segment(0x1001, merged[1:3]),)
    assert inputs[1].writes == (Segment(0x2000, merged[0:3]),)
    assert inputs[2].writes == (Segment(0x3000, merged[0:1]),)
    assert [(t.kind, t.source, t.offset, t.data) for t in traffic] == [
        ("shared_memory", 0, 0, a[0:2]), ("shared_memory", 2, 1, c[1:3])]
    # nothing changed: nothing to write, no traffic
    inputs, traffic = ex.barrier(200, 100, [result((merged,))] * 3, [b""] * 3)
    assert all(not i.writes for i in inputs) and traffic == []


def test_a_doorbell_is_cleared_and_raises_the_interrupt_after_the_shared_memory_it_guards() -> None:
    region = SharedRegion(((0, 0x1000), (1, 0x2000)), 8)
    bell = Doorbell(source=0, address=0x1100, mask=0x1, target=1, irq=30, latency_ns=0)
    ex = exchange([region, bell], 2, [(ZERO, word(0)), (ZERO,)])
    data = b"pingpong"
    inputs, traffic = ex.barrier(100, 0, [result((data, word(0x3))), result((ZERO,))], [b""] * 2)
    # the doorbell's masked bit is cleared (the other bit stays), the data reaches member 1,
    # and its interrupt is raised at this barrier: the data is there when the handler runs
    assert inputs[0].writes == (Segment(0x1100, word(0x2)),)
    assert inputs[1].writes == (Segment(0x2000, data),) and inputs[1].irqs == (30,)
    assert [t.kind for t in traffic] == ["shared_memory", "interrupt"]
    assert ex.state.counters[1].interrupts == 1


def test_doorbell_rings_in_one_quantum_coalesce_and_latency_defers_the_interrupt() -> None:
    bell = Doorbell(source=0, address=0x1100, mask=0xFFFFFFFF, target=1, irq=5, latency_ns=1_000)  # 25 cycles
    ex = exchange([bell], 2, [(word(0),), ()])
    inputs, _ = ex.barrier(10, 0, [result((word(7),)), result()], [b""] * 2)
    assert inputs[1].irqs == () and ex.state.pending == [(35, 0)]  # due at 10 + 25 reference cycles
    inputs, _ = ex.barrier(20, 10, [result((word(0),)), result()], [b""] * 2)
    assert inputs[1].irqs == ()
    inputs, traffic = ex.barrier(40, 20, [result((word(0),)), result()], [b""] * 2)
    assert inputs[1].irqs == (5,) and [t.time_ref for t in traffic] == [40] and ex.state.pending == []


def test_serial_bytes_flow_one_per_barrier_while_the_receiver_takes_them() -> None:
    link = Serial(0, 1, queue_limit=4)
    ex = exchange([link], 2, [(), ()])
    inputs, traffic = ex.barrier(10, 0, [result(), result()], [b"abcdef", b""])
    # four fit the queue, two are dropped and counted; the first is offered to member 1
    assert inputs[1].console == b"a" and inputs[0].console == b""
    assert [(t.kind, t.data) for t in traffic] == [("drop", b"ef")]
    assert ex.state.counters[0].dropped == 2
    # member 1's UART is full: it does not take the byte; the same byte is offered again
    inputs, traffic = ex.barrier(20, 10, [result(), result(accepted=0)], [b"", b""])
    assert inputs[1].console == b"a" and traffic == []
    inputs, traffic = ex.barrier(30, 20, [result(), result(accepted=1)], [b"", b"z"])
    assert [(t.kind, t.source, t.target, t.data, t.time_ref) for t in traffic] == [("serial", 0, 1, b"a", 20)]
    assert inputs[1].console == b"b" and inputs[0].console == b"z"  # both directions at once
    assert bytes(ex.state.queues[0][0]) == b"bcd"


def test_a_delivery_settled_at_a_halt_is_not_counted_again_at_the_barrier() -> None:
    ex = exchange([Serial(0, 1, queue_limit=16)], 2, [(), ()])
    ex.barrier(10, 0, [result(), result()], [b"xy", b""])
    settled = ex.deliveries(10, [0, 1])
    assert [(t.data, t.time_ref) for t in settled] == [(b"x", 10)]
    _, traffic = ex.barrier(20, 10, [result(), result(accepted=1)], [b"", b""])
    assert all(t.kind != "serial" for t in traffic) and ex.state.counters[0].bytes == 1


def test_the_link_state_round_trips_through_its_dict_form() -> None:
    ex = exchange([SharedRegion(((0, 0x1000), (1, 0x2000)), 8), Serial(0, 1, 8),
                   Doorbell(0, 0x1100, 1, 1, 3, 10**6)], 2, [(b"abcdefgh", word(1)), (ZERO,)])
    ex.barrier(10, 0, [result((b"abcdefgh", word(1))), result((ZERO,))], [b"hello", b""])
    again = LinkState.from_dict(ex.state.to_dict())
    assert again == ex.state

"""R7's load: many sessions, several clients each, every client calling its session in a
loop (GetSession, ReadRegisters, ReadMemory, GetSessionMetrics in turn) for a while; the
latency of every call and every error kept. ``scripts/bench reliability`` runs the same
shape of load against a bare grpc.aio echo server as the peer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from machineserver.sdk import AsyncClient
from machineserver.sdk.errors import MachineServerError


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def pct(self, q: float) -> float:
        values = sorted(self.latencies_ms)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    @property
    def calls(self) -> int:
        return len(self.latencies_ms) + len(self.errors)


async def drive(callers: list[Callable[[], Awaitable[object]]], seconds: float) -> LoadResult:
    """Every caller in a loop of its own for ``seconds``."""
    result = LoadResult()
    stop_at = time.perf_counter() + seconds

    async def loop(call: Callable[[], Awaitable[object]]) -> None:
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                await call()
            except MachineServerError as exc:
                result.errors.append(str(exc))
                continue
            result.latencies_ms.append((time.perf_counter() - t) * 1000)

    t = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in callers))
    result.seconds = time.perf_counter() - t
    return result


async def make_sessions(client: AsyncClient, program: str, count: int, prefix: str = "load") -> list[str]:
    """``count`` powered-on, halted Unicorn sessions running nothing yet."""
    names = []
    for k in range(count):
        s = await client.sessions.create_session(board_template="lm3s6965evb", program=program, power_on=True,
                                                 session_id=f"{prefix}{k}")
        names.append(s.session.name)
    return names


def session_callers(clients: list[AsyncClient], sessions: list[str], per_session: int) -> list[Callable[[], Awaitable[object]]]:
    """``per_session`` callers for each session (spread over ``clients``' channels), each
    cycling through four reads of its session."""
    callers = []
    for k, name in enumerate(sessions):
        for j in range(per_session):
            c = clients[(k * per_session + j) % len(clients)]
            ops: list[Callable[[], Awaitable[object]]] = [
                lambda c=c, name=name: c.sessions.get_session(name=name),
                lambda c=c, name=name: c.debug.read_registers(name=name),
                lambda c=c, name=name: c.debug.read_memory(name=name, address=0x20000000, size=64),
                lambda c=c, name=name: c.telemetry.get_session_metrics(name=name),
            ]
            callers.append(_cycle(ops, j))
    return callers


def _cycle(ops: list[Callable[[], Awaitable[object]]], start: int) -> Callable[[], Awaitable[object]]:
    state = {"i": start}

    def next_call() -> Awaitable[object]:
        state["i"] += 1
        return ops[state["i"] % len(ops)]()

    return next_call

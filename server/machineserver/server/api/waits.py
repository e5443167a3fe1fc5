"""Translation for the waits with a budget (core/waits.py): ExpectConsole and
Continue(budget), shared by SessionService and DebugService."""

from __future__ import annotations

from typing import Any

from google.protobuf import duration_pb2
from grpc import aio

from machineserver.server.core.errors import InvalidArgument
from machineserver.server.core.waits import Budget, Usage, WaitOutcome, make_budget
from machineserver.v1 import common_pb2 as common_pb

OUTCOME_TO_PB = {
    WaitOutcome.MATCHED: common_pb.WAIT_OUTCOME_MATCHED,
    WaitOutcome.BUDGET_EXHAUSTED: common_pb.WAIT_OUTCOME_BUDGET_EXHAUSTED,
    WaitOutcome.HOST_GUARD: common_pb.WAIT_OUTCOME_HOST_GUARD,
    WaitOutcome.STOPPED: common_pb.WAIT_OUTCOME_STOPPED,
}


def _seconds(d: duration_pb2.Duration, field: str) -> float:
    if d.seconds < 0 or d.nanos < 0:
        raise InvalidArgument(field, "must not be negative")
    return d.seconds + d.nanos / 1e9


def budget_from_pb(budget: common_pb.Budget, field: str = "budget") -> Budget:
    """A checked core Budget (INVALID_ARGUMENT naming ``budget.instructions`` etc.)."""
    which = budget.WhichOneof("limit")
    guard = _seconds(budget.host_guard, f"{field}.host_guard") if budget.HasField("host_guard") else None
    return make_budget(
        instructions=budget.instructions if which == "instructions" else None,
        virtual_ns=budget.virtual_time_ns if which == "virtual_time_ns" else None,
        host_s=_seconds(budget.host_time, f"{field}.host_time") if which == "host_time" else None,
        guard_s=guard, field=field)


def host_time_pb(used: Usage) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(used.host_s * 1e9))
    return d


def call_time_left(context: aio.ServicerContext[Any, Any] | None, margin: float = 0.2) -> float | None:
    """What a waiting call may use: its deadline less a margin, so the answer (or the
    DEADLINE_EXCEEDED that says what was done) reaches the caller in time."""
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None else max(0.0, remaining - margin)
